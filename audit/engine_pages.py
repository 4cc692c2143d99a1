"""The audit's engine side: a shard's table pages through any worker's web server (the
page format is `streams.client`'s)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import aiohttp
import msgspec

from audit.rows import (
    AuditError,
    Found,
    connect_timeout_s,
    engine_page_timeout_s,
    engine_wait_s,
    sort_key,
)
from streams.client import ShardPage

_decode_page = msgspec.json.Decoder(ShardPage).decode


class Engine:
    """The engine's table views through any worker's web server (it forwards a shard's
    requests to the worker that owns the shard)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        timeout = aiohttp.ClientTimeout(total=engine_page_timeout_s, connect=connect_timeout_s)
        self.session = aiohttp.ClientSession(timeout=timeout)
        try:
            async with self.session.get(f"{self.url}/livez") as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AuditError(
                "engine", f"no worker answers at {self.url} ({exc or type(exc).__name__})"
            ) from None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _get(self, shard: int, params: dict[str, str]) -> ShardPage:
        assert self.session is not None
        url = f"{self.url}/shards/{shard}/balances"
        deadline = time.monotonic() + engine_wait_s
        while True:
            try:
                async with self.session.get(url, params=params) as response:
                    body = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise AuditError("engine", f"GET {url}: {exc or type(exc).__name__}") from None
            if status == 200:
                return _decode_page(body)
            if status != 503 or time.monotonic() > deadline:
                detail = body.decode(errors="replace")[:300]
                raise AuditError("engine", f"GET {url}: {status} {detail}")
            await asyncio.sleep(1.0)  # a rebalance or a recovery: the shard comes back

    async def pages(self, shard: int, size: int) -> AsyncGenerator[list[tuple[str, Found]], None]:
        """The shard's balances, `size` a page, in key order. Balances that never changed
        (an overdraft limit set on an empty balance: seq 0) have no entry and are left out."""
        params = {"limit": str(size)}
        while True:
            page = await self._get(shard, params)
            yield [
                (sort_key(b.account, b.asset), (b.available, b.held, b.seq))
                for b in page.balances
                if b.seq > 0
            ]
            if page.next is None:
                return
            params["after"] = page.next

    async def value(self, account: str, asset: str) -> Found | None:
        """One balance, through the worker's table view of its account."""
        assert self.session is not None
        url = f"{self.url}/balances/{account}"
        try:
            async with self.session.get(url) as response:
                if response.status != 200:
                    text = (await response.text())[:300]
                    raise AuditError("engine", f"GET {url}: {response.status} {text}")
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AuditError("engine", f"GET {url}: {exc or type(exc).__name__}") from None
        found = body["balances"].get(asset)
        if found is None or found["seq"] == 0:
            return None
        return (found["available"], found["held"], found["seq"])
