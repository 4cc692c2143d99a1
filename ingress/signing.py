"""Request signatures: HMAC-SHA256 over everything that changes what a request does, with a
key id naming the client's secret. Pure functions; the client helper (`ingress.client`), the
`tally sign` command, the HTTP bench and the server all use them, so they cannot drift
apart.

A signed request carries four headers:

    Tally-Key-Id:     the client's key id (the secret is shared out of band)
    Tally-Timestamp:  Unix time in whole seconds when the request was signed
    Tally-Nonce:      8-64 characters of A-Z a-z 0-9 _ . -, new for every request
    Tally-Signature:  hex HMAC-SHA256(secret, string_to_sign), 64 lower-case digits

and the string to sign is these nine lines joined by "\\n" (no "\\n" after the last):

    TALLY-HMAC-SHA256-2         the scheme and its version, this exact text
    METHOD                      upper case, e.g. POST
    request target              path and query exactly as sent, e.g. /v1/commands
    timestamp                   the Tally-Timestamp value
    nonce                       the Tally-Nonce value
    key id                      the Tally-Key-Id value
    hex SHA-256 of the body     of the empty string for a request without a body
    Idempotency-Key             the header's value; an empty line when it is absent
    Content-Type                the header's value; an empty line when it is absent

Header values are taken as the server reads them: their bytes as sent (UTF-8 for text),
without leading and trailing spaces and tabs (HTTP strips those). A header cannot hold a
line break, so no two different requests have the same string to sign.

What the signature does not cover cannot change the effect of the request: `Prefer:
wait` only changes how long the answer waits, `Host` and the rest are not read.

A signature is accepted once. The timestamp bounds how long one could be replayed (the
allowed skew, 5 minutes by default, either way), and the ingress remembers every
signature it accepted for as long as its timestamp passes (`ingress.replay`): a second
use answers 401. The nonce lets a client send the same request twice in one second (a
retry) with two different signatures.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Concatenate, ParamSpec

import msgspec

KEY_ID = "Tally-Key-Id"
TIMESTAMP = "Tally-Timestamp"
NONCE = "Tally-Nonce"
SIGNATURE = "Tally-Signature"
IDEMPOTENCY_KEY = "Idempotency-Key"
CONTENT_TYPE = "Content-Type"
SCHEME = "TALLY-HMAC-SHA256-2"
# Every header the signature depends on: each may appear once (the ingress refuses a
# request that repeats one: two values would be two meanings).
SIGNED_HEADERS = (KEY_ID, TIMESTAMP, NONCE, SIGNATURE, IDEMPOTENCY_KEY, CONTENT_TYPE)

_KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}(?!\n)$")
_TIMESTAMP_RE = re.compile(r"^[0-9]{1,12}(?!\n)$")
_NONCE_RE = re.compile(r"^[A-Za-z0-9_.-]{8,64}(?!\n)$")
_SIGNATURE_RE = re.compile(r"^[0-9a-f]{64}(?!\n)$")
_OWS = b" \t"
# Compared against when the key id is unknown, so that an unknown id costs the same
# work as a known one.
_NO_SECRET = b"\0" * 32
_P = ParamSpec("_P")


class SignatureError(Exception):
    """The request is not signed, or not signed right. `field` names the header."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


class Verified(msgspec.Struct, frozen=True):
    """A request whose signature checked out: who signed it, and the signature with the
    time (Unix seconds) until which its timestamp would pass, for the replay check."""

    key_id: str
    signature: str
    valid_until_s: int


def _wire(value: str | bytes | None) -> bytes:
    """A header value as the server reads it: its bytes (aiohttp decodes them as UTF-8
    with surrogateescape, which this undoes), without surrounding spaces and tabs."""
    if value is None:
        return b""
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    raw = raw.strip(_OWS)
    if b"\n" in raw or b"\r" in raw:
        raise ValueError("a header value cannot hold a line break")
    return raw


def string_to_sign(
    method: str,
    target: str,
    timestamp: str,
    nonce: str,
    key_id: str,
    body: bytes,
    *,
    idempotency_key: str | bytes | None = None,
    content_type: str | bytes | None = None,
) -> bytes:
    """The exact bytes the signature is the HMAC of (see the module docstring)."""
    lines = (
        SCHEME.encode(),
        method.upper().encode(),
        _wire(target),
        _wire(timestamp),
        _wire(nonce),
        _wire(key_id),
        hashlib.sha256(body).hexdigest().encode(),
        _wire(idempotency_key),
        _wire(content_type),
    )
    return b"\n".join(lines)


def _hmac_of(message: Callable[_P, bytes]) -> Callable[Concatenate[bytes, _P], str]:
    def signature(secret: bytes, /, *args: _P.args, **kwargs: _P.kwargs) -> str:
        return hmac.new(secret, message(*args, **kwargs), hashlib.sha256).hexdigest()

    return signature


# `signature(secret, <the arguments of string_to_sign>)`: the hex HMAC-SHA256 of that
# string, so that what is signed is defined once, by string_to_sign's parameters.
signature = _hmac_of(string_to_sign)


def new_nonce() -> str:
    """16 random characters of the nonce alphabet (96 bits)."""
    return secrets.token_urlsafe(12)


def sign(
    key_id: str,
    secret: bytes,
    method: str,
    target: str,
    body: bytes = b"",
    *,
    idempotency_key: str | bytes | None = None,
    content_type: str | bytes | None = None,
    nonce: str | None = None,
    now: float | None = None,
) -> dict[str, str]:
    """The four headers that sign one request. `idempotency_key` and `content_type` are
    the values of those headers as the request will send them (None: not sent)."""
    timestamp = str(int(time.time() if now is None else now))
    nonce = new_nonce() if nonce is None else nonce
    return {
        KEY_ID: key_id,
        TIMESTAMP: timestamp,
        NONCE: nonce,
        SIGNATURE: signature(
            secret, method, target, timestamp, nonce, key_id, body,
            idempotency_key=idempotency_key, content_type=content_type,
        ),
    }  # fmt: skip


def verify(
    keys: Mapping[str, bytes],
    headers: Mapping[str, str],
    method: str,
    target: str,
    body: bytes,
    *,
    max_skew_s: int,
    now: float | None = None,
) -> Verified:
    """Return who signed a correctly signed request; raise SignatureError otherwise. The
    error says which header is wrong and how, never what the right value was. (That the
    signature was not used before is the caller's check: `ingress.replay`.)"""
    key_id = headers.get(KEY_ID)
    timestamp = headers.get(TIMESTAMP)
    nonce = headers.get(NONCE)
    given = headers.get(SIGNATURE)
    for name, value in ((KEY_ID, key_id), (TIMESTAMP, timestamp), (NONCE, nonce),
                        (SIGNATURE, given)):  # fmt: skip
        if value is None:
            raise SignatureError(name, f"missing header {name}; see the README's signing section")
    assert key_id is not None and timestamp is not None and nonce is not None
    assert given is not None
    if not _KEY_ID_RE.match(key_id):
        raise SignatureError(KEY_ID, "malformed key id: 1-64 characters of A-Z a-z 0-9 _ . -")
    if not _TIMESTAMP_RE.match(timestamp):
        raise SignatureError(TIMESTAMP, "malformed timestamp: Unix time in whole seconds")
    if not _NONCE_RE.match(nonce):
        raise SignatureError(NONCE, "malformed nonce: 8-64 characters of A-Z a-z 0-9 _ . -")
    if not _SIGNATURE_RE.match(given):
        raise SignatureError(SIGNATURE, "malformed signature: 64 lower-case hex digits")
    skew = int(timestamp) - (time.time() if now is None else now)
    if abs(skew) > max_skew_s:
        raise SignatureError(
            TIMESTAMP, f"timestamp is {abs(skew):.0f}s from the server's clock (max {max_skew_s}s)"
        )
    secret = keys.get(key_id)
    expected = signature(
        secret or _NO_SECRET, method, target, timestamp, nonce, key_id, body,
        idempotency_key=headers.get(IDEMPOTENCY_KEY), content_type=headers.get(CONTENT_TYPE),
    )  # fmt: skip
    if not hmac.compare_digest(expected, given) or secret is None:
        # One answer for an unknown key id and a wrong signature: which key ids exist
        # is not something to tell an unauthenticated caller.
        raise SignatureError(SIGNATURE, "signature does not match this request and key id")
    return Verified(key_id, given, int(timestamp) + max_skew_s)
