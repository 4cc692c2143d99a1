"""The audit's Redis side: a page of balance hashes and asset-set memberships per script
call (one shard's keys: one slot of a Redis Cluster), and the shards' keys counted and
scanned (on a cluster, SCAN runs on every master: redis-py's cluster scan_iter)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from audit.rows import AuditError, Found, connect_timeout_s, redis_scan_count, sort_key
from sinks import redis_client
from sinks.redis_client import ERRORS as REDIS_ERRORS
from sinks.redis_store import assets_key, balance_key

# KEYS: a page's balance keys, then their accounts' asset-set keys (one hash slot: the
# shard's). Returns available, held, seq and 1/0 "the asset is in the account's set",
# four values a key: one round trip and one reply a page instead of one per key.
READ_SCRIPT = """
local n = #KEYS / 2
local out = {}
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i], 'available', 'held', 'seq')
  out[#out + 1] = v[1]
  out[#out + 1] = v[2]
  out[#out + 1] = v[3]
  out[#out + 1] = redis.call('SISMEMBER', KEYS[n + i], string.match(KEYS[i], '([^:]+)$'))
end
return out
"""


def _int(raw: bytes | None) -> int | None:
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None


class Redis:
    def __init__(self, url: str, prefix: str, shown_url: str, *, cluster: bool = False) -> None:
        self.url = url
        self.cluster = cluster
        self.prefix = prefix
        self.shown_url = shown_url
        self.client: Any = None
        self.script: Any = None

    async def open(self) -> None:
        self.client = redis_client.connect(
            self.url,
            cluster=self.cluster,
            socket_timeout=30,
            socket_connect_timeout=connect_timeout_s,
        )
        try:
            await self.client.ping()
        except REDIS_ERRORS as exc:
            raise AuditError("Redis", f"unreachable at {self.shown_url} ({exc})") from None
        self.script = self.client.register_script(READ_SCRIPT)

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()

    async def read(self, shard: int, keys: Sequence[str]) -> list[tuple[Found | None, bool]]:
        """Per `account|asset` key: the balance hash (None if absent) and whether the
        asset is listed in the account's asset set."""
        if not keys:
            return []
        split = [key.rpartition("|") for key in keys]
        names = [balance_key(self.prefix, shard, a, asset) for a, _, asset in split]
        names += [assets_key(self.prefix, shard, a) for a, _, _ in split]
        try:
            values = await self.script(keys=names)
        except REDIS_ERRORS as exc:
            raise AuditError("Redis", str(exc)) from None
        out: list[tuple[Found | None, bool]] = []
        for i in range(0, len(values), 4):
            available, held, seq, listed = values[i : i + 4]
            if available is None and held is None and seq is None:
                out.append((None, bool(listed)))
            else:
                out.append(((_int(available), _int(held), _int(seq)), bool(listed)))
        return out

    def _shard_of_key(self, key: bytes) -> int | None:
        text = key.decode()
        start = len(self.prefix) + 2
        end = text.find("}", start)
        return int(text[start:end]) if text[start:end].isdigit() else None

    async def counts(self) -> Counter[int]:
        """The number of balance keys of each shard (SCAN: keys are counted, not kept)."""
        counts: Counter[int] = Counter()
        try:
            async for key in self.client.scan_iter(
                match=f"{self.prefix}:{{*}}:balance:*", count=redis_scan_count
            ):
                shard = self._shard_of_key(key)
                if shard is not None:
                    counts[shard] += 1
        except REDIS_ERRORS as exc:
            raise AuditError("Redis", str(exc)) from None
        return counts

    async def keys_of(self, shard: int, size: int) -> AsyncGenerator[list[tuple[str, str]], None]:
        """A shard's balance keys as (account, asset), a page at a time, in SCAN order."""
        head = f"{self.prefix}:{{{shard}}}:balance:"
        page: list[tuple[str, str]] = []
        try:
            async for key in self.client.scan_iter(match=f"{head}*", count=redis_scan_count):
                account, _, asset = key.decode()[len(head) :].rpartition(":")
                page.append((account, asset))
                if len(page) >= size:
                    yield page
                    page = []
        except REDIS_ERRORS as exc:
            raise AuditError("Redis", str(exc)) from None
        if page:
            yield page

    async def value(self, shard: int, account: str, asset: str) -> Found | None:
        return (await self.read(shard, [sort_key(account, asset)]))[0][0]
