"""`tally audit`: recompute every balance from the ledger and compare every store with it,
one shard at a time, in bounded memory.

The reference is the ledger in PostgreSQL. A balance is its last breakpoint's `*_after`
plus the deltas of its entries after the breakpoint's `to_seq` (the sum of all its
entries when it has no breakpoint yet), and its seq is its last entry's. PostgreSQL
`balances`, the Redis hashes and the engine's tables are each compared with that,
balance by balance. Besides, the seqs of each balance's entries must be exactly 1..n,
its breakpoint must agree with the sum of all its entries, and per asset the
recomputed balances must add up to the money that came in and went out (conservation).

Memory. Nothing is loaded whole. Per shard, PostgreSQL streams one row per balance
(its `balances` row and its recomputation, joined and aggregated by the server) through
a server-side cursor, sorted by the bytes of `account|asset`, which is the order of the
engine's RocksDB keys (`b|account|asset`); the engine pages through the same shard in
the same order. The two sorted streams are merged a page at a time, and the Redis hashes
of each merged page are read with one script call (a shard's keys share one hash slot),
with whether each asset is listed in its account's asset set.
At most `shards_in_flight` shards are open at once, each holding about one page of each
source. Redis keys that no other source knows of are found by counting each shard's
keys with SCAN, and only when a count disagrees by checking the scanned keys page by
page.

Consistency. Each store is read as it is when its page is read: audit a deployment
whose sinks have drained. Under load, what is still in flight shows up as differences.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from audit.compare import compare
from audit.engine_pages import Engine
from audit.merge import OutOfOrder, aligned
from audit.postgres import Postgres
from audit.redis_hashes import Redis
from audit.report import Report, render
from audit.rows import (
    AuditError,
    Found,
    LedgerRow,
    Mismatch,
    batch_size_default,
    batch_size_max,
    describe,
    shards_in_flight,
    show_default,
)
from core.progress import Progress
from core.settings import Settings
from topics.money import Flow, conservation
from topics.shard import shard_of

# What `tally audit` and the harness call; the parts live in the modules beside this one.
__all__ = ["Audit", "AuditError", "Report", "render"]


@dataclass
class ShardTally:
    """What one shard's audit found, in bounded space: counts, sums per asset and the
    first `show` mismatches."""

    shard: int
    show: int
    compared: Counter[str] = field(default_factory=Counter)
    mismatches: Counter[str] = field(default_factory=Counter)
    first: list[Mismatch] = field(default_factory=list)
    sums: Counter[str] = field(default_factory=Counter)
    balances: int = 0

    def add(self, found: list[Mismatch]) -> None:
        for mismatch in found:
            self.mismatches[mismatch.kind] += 1
            if len(self.first) < self.show:
                self.first.append(mismatch)

    def count(self, row: LedgerRow | None, engine: Found | None, redis: Found | None) -> None:
        self.balances += 1
        if row is not None:
            ledger = row.ledger
            if ledger is not None:
                self.compared["ledger"] += 1
                self.sums[row.asset] += ledger[0] + ledger[1]
            if row.seq is not None:
                self.compared["postgres"] += 1
        if redis is not None:
            self.compared["redis"] += 1
        if engine is not None:
            self.compared["engine"] += 1


async def _empty() -> AsyncGenerator[list[tuple[str, Found]], None]:
    return
    yield


class Audit:
    """One audit of a deployment (the settings' topic prefix and shard count)."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine_url: str | None,
        with_redis: bool = True,
        show: int = show_default,
        batch_size: int = batch_size_default,
        say: Callable[[str], None] | None = None,
        progress_tty: bool | None = None,
    ) -> None:
        if not 1 <= batch_size <= batch_size_max:
            raise ValueError(f"batch_size must be within 1..{batch_size_max}")
        shown = settings.redacted()
        self.schema = settings.topic_prefix
        self.partitions = settings.partitions
        self.pg = Postgres(settings.pg_dsn, self.schema, shown["pg_dsn"])
        self.redis = (
            Redis(
                settings.redis_url,
                settings.topic_prefix,
                shown["redis_url"],
                cluster=settings.redis_cluster,
            )
            if with_redis
            else None
        )
        self.engine = Engine(engine_url) if engine_url is not None else None
        self.show = show
        self.batch_size = batch_size
        self.say = say
        self.progress_tty = progress_tty

    async def run(self) -> Report:
        started = time.monotonic()
        try:
            # Fail fast, naming the store, before any long work.
            await self.pg.open(self.partitions)
            if self.redis is not None:
                await self.redis.open()
            if self.engine is not None:
                await self.engine.open()
            return await self._run(started)
        finally:
            await self.pg.close()
            if self.redis is not None:
                await self.redis.close()
            if self.engine is not None:
                await self.engine.close()

    async def _run(self, started: float) -> Report:
        total = await self.pg.count()
        tallies: list[ShardTally] = []
        shards = iter(range(self.partitions))
        with Progress(
            "audit", total, unit="balances", say=self.say, tty=self.progress_tty
        ) as progress:

            async def worker() -> None:
                for shard in shards:
                    tallies.append(await self._shard(shard, progress))

            try:
                async with asyncio.TaskGroup() as group:
                    flows_task = group.create_task(self.pg.flows())
                    counts_task = (
                        group.create_task(self.redis.counts()) if self.redis is not None else None
                    )
                    for _ in range(min(shards_in_flight, self.partitions)):
                        group.create_task(worker())
            except BaseExceptionGroup as group_error:
                raise _first_audit_error(group_error) from None
        tallies.sort(key=lambda t: t.shard)
        if counts_task is not None:
            counts = counts_task.result()
            for tally in tallies:
                if counts[tally.shard] > tally.compared["redis"]:
                    await self._redis_extras(tally)
        return self._report(tallies, flows_task.result(), time.monotonic() - started)

    async def _shard(self, shard: int, progress: Progress) -> ShardTally:
        tally = ShardTally(shard, self.show)
        pg_pages = self.pg.pages(shard, self.batch_size)
        engine_pages = (
            self.engine.pages(shard, self.batch_size) if self.engine is not None else _empty()
        )
        merged = aligned(pg_pages, engine_pages)
        with_engine = self.engine is not None
        with_redis = self.redis is not None
        async with (
            contextlib.aclosing(merged),
            contextlib.aclosing(pg_pages),
            contextlib.aclosing(engine_pages),
        ):
            try:
                async for chunk in merged:
                    redis = (
                        await self.redis.read(shard, [key for key, _, _ in chunk])
                        if self.redis is not None
                        else None
                    )
                    for i, (key, row, engine) in enumerate(chunk):
                        value, listed = redis[i] if redis is not None else (None, True)
                        tally.count(row, engine, value)
                        found = compare(
                            shard, key, row, engine, value,
                            with_engine=with_engine, with_redis=with_redis, redis_listed=listed,
                        )  # fmt: skip
                        if found:
                            tally.add(found)
                    progress.add(len(chunk))
            except OutOfOrder as exc:
                store = "PostgreSQL" if exc.side == "left" else "engine"
                raise AuditError(store, f"shard {shard}: {exc}") from None
        return tally

    async def _redis_extras(self, tally: ShardTally) -> None:
        """Name the Redis balances of a shard that neither PostgreSQL nor the engine has:
        its keys checked a page at a time (only when its key count says there are some)."""
        assert self.redis is not None
        shard = tally.shard
        pages = self.redis.keys_of(shard, self.batch_size)
        async with contextlib.aclosing(pages):
            async for page in pages:
                for account, asset in await self.pg.unknown(shard, page):
                    if (
                        self.engine is not None
                        and shard_of(account, self.partitions) == shard
                        and await self.engine.value(account, asset) is not None
                    ):
                        continue  # an engine-only balance: the merge reported it already
                    value = await self.redis.value(shard, account, asset)
                    seq = value[2] if value is not None else None
                    tally.add(
                        [Mismatch("redis", shard, account, asset, seq,
                                  "(ledger) no balance (no ledger entries)",
                                  f"(Redis) {describe(value)}")]
                    )  # fmt: skip

    def _report(
        self, tallies: list[ShardTally], flows: Counter[tuple[str, Flow]], seconds: float
    ) -> Report:
        compared: Counter[str] = Counter()
        mismatches: Counter[str] = Counter()
        sums: Counter[str] = Counter()
        first: list[Mismatch] = []
        for tally in tallies:
            compared.update(tally.compared)
            mismatches.update(tally.mismatches)
            sums.update(tally.sums)
            first.extend(tally.first)
        assets = conservation(sums, flows)
        wrong = sum(not f.ok for f in assets)
        if wrong:
            mismatches["conservation"] += wrong
        sources = ["postgres"]
        skipped: list[str] = []
        for name, source in (("redis", self.redis), ("engine", self.engine)):
            (sources if source is not None else skipped).append(name)
        return Report(
            schema=self.schema,
            shards=self.partitions,
            sources=sources,
            skipped=skipped,
            balances=sum(t.balances for t in tallies),
            compared=compared,
            mismatches=mismatches,
            first=first[: self.show],
            flows=assets,
            seconds=seconds,
        )


def _first_audit_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The AuditError inside a task group's failure (what the user needs to read), else
    the first error as it is."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            error = _first_audit_error(error)
        if isinstance(error, AuditError):
            return error
    return group.exceptions[0]
