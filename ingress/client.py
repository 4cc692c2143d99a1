"""A small Python client for the ingress that signs every request.

    async with Client("http://127.0.0.1:8080", "demo", secret) as tally:
        answer = await tally.submit(
            {"kind": "deposit", "command_id": "dep-1", "account": "alice",
             "asset": "USD", "amount": 500}, wait=5)
        print(answer.status, answer.body)          # 200 and the result event
        print((await tally.balances("alice", strong=True)).body)

Commands are dicts (or `topics.schema` structs); bodies are sent byte-for-byte as
signed, and every request gets a signature of its own (the ingress accepts each once).
Retrying `submit` with the same command_id is always safe.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import aiohttp
import msgspec
import yarl

from ingress import signing
from topics.ids import path_segment

_json = msgspec.json.Encoder()


class Answer(msgspec.Struct, frozen=True):
    status: int
    body: Any
    headers: dict[str, str]


class Client:
    def __init__(
        self,
        base_url: str,
        key_id: str | None = None,
        secret: bytes | str | None = None,
        *,
        timeout_s: float = 40.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.key_id = key_id
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """Send one request to `target` (path and query), signed when a key is set."""
        assert self._session is not None, "use `async with Client(...)`"
        sent = dict(headers or {})
        if body and "Content-Type" not in sent:
            sent["Content-Type"] = "application/json"
        if self.key_id is not None and self.secret is not None:
            # Signed with the values the request sends (each signature is used once: a
            # retry through this method is signed anew, with a new nonce).
            named = {k.lower(): v for k, v in sent.items()}
            sent.update(
                signing.sign(
                    self.key_id, self.secret, method, target, body,
                    idempotency_key=named.get(signing.IDEMPOTENCY_KEY.lower()),
                    content_type=named.get(signing.CONTENT_TYPE.lower()),
                )
            )  # fmt: skip
        # encoded=True: sent byte for byte as signed (yarl would otherwise unescape
        # "%3A" to ":" and resolve "..", and the signature would no longer match).
        url = yarl.URL(self.base_url + target, encoded=True)
        # aiohttp adds "Content-Type: application/octet-stream" to a POST without a
        # body; that header is signed, so it is only ever sent when the caller set it.
        skip = () if "content-type" in {k.lower() for k in sent} else ("Content-Type",)
        async with self._session.request(
            method, url, data=body or None, headers=sent, skip_auto_headers=skip
        ) as response:
            raw = await response.read()
            try:
                parsed: Any = msgspec.json.decode(raw) if raw else None
            except msgspec.DecodeError:
                parsed = raw.decode(errors="replace")
            return Answer(response.status, parsed, dict(response.headers))

    async def submit(
        self, command: Any, *, wait: int = 0, idempotency_key: str | None = None
    ) -> Answer:
        """POST /v1/commands; with `wait`, up to that many seconds for the result."""
        headers = {}
        if wait:
            headers["Prefer"] = f"wait={wait}"
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return await self.request("POST", "/v1/commands", _json.encode(command), headers)

    async def submit_batch(self, commands: list[Any], *, wait: int = 0) -> Answer:
        """POST /v1/commands/batch (at most 1,000 commands), answered per item; with
        `wait`, each item up to that many seconds for its result."""
        headers = {"Prefer": f"wait={wait}"} if wait else None
        return await self.request(
            "POST", "/v1/commands/batch", _json.encode({"commands": commands}), headers
        )

    async def balances(self, account: str, *, strong: bool = False) -> Answer:
        target = f"/v1/accounts/{path_segment(account)}/balances"
        if strong:
            target += "?consistency=strong"
        return await self.request("GET", target)

    async def result(self, command_id: str, account: str | None = None) -> Answer:
        target = f"/v1/commands/{path_segment(command_id)}"
        if account is not None:
            target += "?" + urlencode({"account": account})
        return await self.request("GET", target)

    async def commands(self, reference: str) -> Answer:
        """GET /v1/commands?reference=...: the commands that carry a reference."""
        return await self.request("GET", "/v1/commands?" + urlencode({"reference": reference}))

    async def account(self, account: str) -> Answer:
        """GET /v1/accounts/{account}: status, assets, overdraft limits, last seqs."""
        return await self.request("GET", f"/v1/accounts/{path_segment(account)}")

    async def entries(
        self,
        account: str,
        asset: str,
        *,
        after_seq: int | None = None,
        before_seq: int | None = None,
        limit: int | None = None,
    ) -> Answer:
        """One page of a balance's history, oldest first; follow `body["next"]` with
        `page` for the next one."""
        query: dict[str, Any] = {"asset": asset}
        for name, value in (("after_seq", after_seq), ("before_seq", before_seq),
                            ("limit", limit)):  # fmt: skip
            if value is not None:
                query[name] = value
        return await self.request(
            "GET", f"/v1/accounts/{path_segment(account)}/entries?{urlencode(query)}"
        )

    async def page(self, link: str) -> Answer:
        """GET a `next` link of a history page."""
        return await self.request("GET", link)

    async def balances_at(
        self,
        account: str,
        *,
        at: str | int | None = None,
        seq: int | None = None,
        asset: str | None = None,
    ) -> Answer:
        """The balances as they were at a time (RFC 3339 or epoch ms) or after a seq
        (with one asset)."""
        query: dict[str, Any] = {}
        if at is not None:
            query["at"] = at
        if seq is not None:
            query["seq"] = seq
        if asset is not None:
            query["asset"] = asset
        return await self.request(
            "GET", f"/v1/accounts/{path_segment(account)}/balances?{urlencode(query)}"
        )
