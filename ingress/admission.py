"""The checks every /v1 request goes through before its handler reads it, in this order:
size (413) -> repeated headers (400) -> body read in time (408) -> signature (401)
-> rate limit (429) -> first use of the signature (401, or 503 when Redis cannot tell).
A client that goes away while sending its body is `ClientGone`: counted, not answered."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from core.settings import Settings
from ingress import signing
from ingress.connections import Connections
from ingress.problems import Problem
from ingress.ratelimit import TokenBuckets
from ingress.replay import ReplayUnknown

# Headers that change what a request does or who sent it: a request may give each once.
# (Prefer may repeat, as RFC 7240 allows, but not its `wait`: see ingress.waiting.)
SINGLE_HEADERS = signing.SIGNED_HEADERS
_UNAUTHORIZED = {"WWW-Authenticate": 'Tally-HMAC-SHA256 realm="tally"'}


class ClientGone(Exception):
    """The client closed the connection before its request was read."""


class Admission:
    """Admits a request: reads its body (bounded in size and time), checks the
    signature, takes one token of the client's rate limit and checks that the signature
    is used for the first time (with the connections' `seen`, once open)."""

    def __init__(self, settings: Settings, connections: Connections) -> None:
        self.settings = settings
        self.keys = settings.client_keys()
        self.insecure = settings.ingress_insecure
        self.buckets = TokenBuckets(settings.ingress_rate_per_s, settings.ingress_rate_burst)
        self.body_timeout_s = settings.ingress_body_timeout_ms / 1000
        self.connections = connections

    async def admit(self, request: web.Request) -> tuple[str, bytes]:
        """The client (key id, or address when unsigned) and the body; a batch pays
        for its other commands once parsed (`limit`)."""
        limit = self.settings.ingress_body_max_bytes
        if request.content_length is not None and request.content_length > limit:
            raise Problem(
                413,
                "body too large",
                f"{request.content_length} bytes; the limit is {limit}",
                field="body",
            )
        single_headers(request)
        body = await self._read(request)
        if self.insecure:
            client = f"address:{request.remote}"
            self.limit(client, 1)
        else:
            client = await self._authenticate(request, body)
        return client, body

    async def _read(self, request: web.Request) -> bytes:
        limit = self.settings.ingress_body_max_bytes
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Problem(
                413, "body too large", f"the limit is {limit} bytes", field="body"
            ) from None
        except TimeoutError:
            timeout_ms = self.settings.ingress_body_timeout_ms
            raise Problem(
                408,
                "body too slow",
                f"the body did not arrive within {timeout_ms} ms",
                field="body",
                close=True,
            ) from None
        except ConnectionError as exc:  # aiohttp's ClientConnectionResetError is one
            raise ClientGone(type(exc).__name__) from None
        except HttpProcessingError as exc:  # a chunked body that breaks its framing
            raise Problem(
                400,
                "malformed body framing",
                exc.message[:200],
                field="body",
                close=True,
            ) from None

    async def _authenticate(self, request: web.Request, body: bytes) -> str:
        try:
            signed = signing.verify(
                self.keys,
                request.headers,
                request.method,
                request.raw_path,
                body,
                max_skew_s=self.settings.ingress_max_skew_s,
            )
        except signing.SignatureError as exc:
            raise Problem(
                401, "request not signed correctly", exc.detail, field=exc.field,
                headers=_UNAUTHORIZED,
            ) from None  # fmt: skip
        # The rate limit before the claim: what a client can make Redis hold is bounded
        # by its rate times the skew window.
        self.limit(signed.key_id, 1)
        await self._first_use(signed)
        return signed.key_id

    async def _first_use(self, signed: signing.Verified) -> None:
        seen = self.connections.seen
        assert seen is not None
        ttl_s = signed.valid_until_s - int(time.time()) + 1
        try:
            first = await seen.claim(signed.key_id, signed.signature, ttl_s)
        except ReplayUnknown as exc:
            raise Problem(
                503,
                "Redis unavailable",
                f"cannot check that the signature is new ({exc}); retry with a new signature",
                field="redis",
                headers={"Retry-After": "2"},
            ) from None
        if not first:
            raise Problem(
                401,
                "signature already used",
                "a signature is accepted once: sign the request again (a new nonce)",
                field=signing.SIGNATURE,
                headers=_UNAUTHORIZED,
            )

    def limit(self, client: str, cost: int) -> None:
        """Take `cost` tokens of the client's rate limit, or refuse (429)."""
        wait_s = self.buckets.take(client, cost)
        if wait_s > 0:
            raise Problem(
                429,
                "rate limit exceeded",
                f"this client may send {self.settings.ingress_rate_per_s} commands/s "
                f"(bursts of {self.settings.ingress_rate_burst})",
                headers={"Retry-After": TokenBuckets.retry_after(wait_s)},
            )


def single_headers(request: web.Request) -> None:
    """Refuse a request that gives a header of SINGLE_HEADERS twice. (aiohttp's parser
    already refuses a second Content-Type, Content-Length, Host and a few more.)"""
    headers = request.headers
    for name in SINGLE_HEADERS:
        if len(headers.getall(name, ())) > 1:
            raise Problem(
                400, "repeated header", f"{name} is given more than once; give it once",
                field=name,
            )  # fmt: skip
