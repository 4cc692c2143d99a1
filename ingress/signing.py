"""Request signatures: HMAC-SHA256 over what a request does, with a key id naming the
client's secret. Pure functions; the client helper (`tally.client`) and the server both
use them, so the two cannot drift apart.

A signed request carries three headers:

    Tally-Key-Id:     the client's key id (the secret is shared out of band)
    Tally-Timestamp:  Unix time in whole seconds when the request was signed
    Tally-Signature:  hex HMAC-SHA256(secret, string_to_sign)

and the string to sign is four lines joined by "\\n":

    METHOD                      upper case, e.g. POST
    request target              path and query exactly as sent, e.g. /v1/commands
    timestamp                   the Tally-Timestamp value
    hex SHA-256 of the body     of the empty string for a request without a body

The timestamp bounds how long a captured request can be replayed (the allowed skew,
5 minutes by default); the idempotency key makes a replayed command a duplicate.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping

KEY_ID = "Tally-Key-Id"
TIMESTAMP = "Tally-Timestamp"
SIGNATURE = "Tally-Signature"

_KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}(?!\n)$")
_TIMESTAMP_RE = re.compile(r"^[0-9]{1,12}(?!\n)$")
_SIGNATURE_RE = re.compile(r"^[0-9a-f]{64}(?!\n)$")
# Compared against when the key id is unknown, so that an unknown id costs the same
# work as a known one.
_NO_SECRET = b"\0" * 32


class SignatureError(Exception):
    """The request is not signed, or not signed right. `field` names the header."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


def string_to_sign(method: str, target: str, timestamp: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"{method.upper()}\n{target}\n{timestamp}\n{digest}".encode()


def signature(secret: bytes, method: str, target: str, timestamp: str, body: bytes) -> str:
    message = string_to_sign(method, target, timestamp, body)
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(
    key_id: str,
    secret: bytes,
    method: str,
    target: str,
    body: bytes = b"",
    *,
    now: float | None = None,
) -> dict[str, str]:
    """The three headers that sign one request."""
    timestamp = str(int(time.time() if now is None else now))
    return {
        KEY_ID: key_id,
        TIMESTAMP: timestamp,
        SIGNATURE: signature(secret, method, target, timestamp, body),
    }


def verify(
    keys: Mapping[str, bytes],
    headers: Mapping[str, str],
    method: str,
    target: str,
    body: bytes,
    *,
    max_skew_s: int,
    now: float | None = None,
) -> str:
    """Return the key id of a correctly signed request; raise SignatureError otherwise.
    The error says which header is wrong and how, never what the right value was."""
    key_id = headers.get(KEY_ID)
    timestamp = headers.get(TIMESTAMP)
    given = headers.get(SIGNATURE)
    for name, value in ((KEY_ID, key_id), (TIMESTAMP, timestamp), (SIGNATURE, given)):
        if value is None:
            raise SignatureError(name, f"missing header {name}; see the README's signing section")
    assert key_id is not None and timestamp is not None and given is not None
    if not _KEY_ID_RE.match(key_id):
        raise SignatureError(KEY_ID, "malformed key id: 1-64 characters of A-Z a-z 0-9 _ . -")
    if not _TIMESTAMP_RE.match(timestamp):
        raise SignatureError(TIMESTAMP, "malformed timestamp: Unix time in whole seconds")
    if not _SIGNATURE_RE.match(given):
        raise SignatureError(SIGNATURE, "malformed signature: 64 lower-case hex digits")
    skew = int(timestamp) - (time.time() if now is None else now)
    if abs(skew) > max_skew_s:
        raise SignatureError(
            TIMESTAMP, f"timestamp is {abs(skew):.0f}s from the server's clock (max {max_skew_s}s)"
        )
    secret = keys.get(key_id)
    expected = signature(secret or _NO_SECRET, method, target, timestamp, body)
    if not hmac.compare_digest(expected, given) or secret is None:
        # One answer for an unknown key id and a wrong signature: which key ids exist
        # is not something to tell an unauthenticated caller.
        raise SignatureError(SIGNATURE, "signature does not match this request and key id")
    return key_id
