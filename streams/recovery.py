"""Recovery and standby: bringing a shard's local RocksDB up to the end of its changelog
partition before the shard is served (`recover`), and keeping the shards this worker does
not own but were placed here as standby copies warm by tailing their changelogs
(`standby`, TALLY_TABLE_STANDBY_REPLICAS).

Both copy changelog records into the store as they are (the changelog carries the
store's own keys and values) with the offset they reached, in one RocksDB write. Both
read with read_committed: a batch whose transaction aborted never reaches a store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import TopicPartition

from core.progress import Progress
from streams.store import ShardStore

log = logging.getLogger(__name__)

recovery_log_every_s = 2.0
# One fetch of a changelog partition: records copied per RocksDB write.
restore_poll_records_max = 20_000
restore_poll_timeout_ms = 500
standby_idle_s = 0.5
# How long a take-over waits for a previous owner's transaction to end on the shard's
# changelog partition (its coordinator aborts it after the producer's transaction
# timeout, `streams.ownership.transaction_timeout_ms`), and how often it looks.
settle_timeout_s = 30.0
settle_backoff_s = 0.05


def _changelog_reader(bootstrap: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )


async def recover(
    bootstrap: str,
    changelog: str,
    shards: list[int],
    *,
    store: Callable[[int], ShardStore],
    counts: Counter[str],
    ready: Callable[[list[int]], Awaitable[None]] | None = None,
) -> None:
    """Bring each shard's RocksDB up to the end of its changelog partition. `store(p)`
    opens (or returns the open) store of shard p. With `ready`, the shards whose changelog
    no transaction holds open are caught up first and handed to `ready`, and the others
    then, as each settles (see `_settled`); without it, all of them at once."""
    if not shards:
        return
    restore = _changelog_reader(bootstrap)
    await restore.start()
    try:
        left = {p: TopicPartition(changelog, p) for p in shards}
        while left:
            ends = await _settled(
                bootstrap,
                restore,
                list(left.values()),
                timeout_s=settle_timeout_s,
                some=ready is not None,
            )
            group = sorted(tp.partition for tp in ends)
            await _catch_up(restore, {p: left[p] for p in group}, ends, store, counts)
            for p in group:
                del left[p]
            if ready is not None:
                await ready(group)
    finally:
        await restore.stop()


async def _catch_up(
    restore: AIOKafkaConsumer,
    tps: dict[int, TopicPartition],
    ends: dict[TopicPartition, int],
    store: Callable[[int], ShardStore],
    counts: Counter[str],
) -> None:
    """Copy each shard's changelog, from the offset its store reached, up to `ends`."""
    restore.assign(list(tps.values()))
    todo: dict[TopicPartition, int] = {}
    total = 0
    for p, tp in tps.items():
        start = _start_of(p, store(p), ends[tp], counts)
        if start < ends[tp]:
            restore.seek(tp, start)
            todo[tp] = ends[tp]
            total += ends[tp] - start
    if not todo:
        return
    progress = Progress(
        f"recovering shards {sorted(tps)}",
        total,
        unit="changelog records",
        say=log.info,
        every_s=recovery_log_every_s,
    )
    while todo:
        polled = await restore.getmany(
            *todo, timeout_ms=restore_poll_timeout_ms, max_records=restore_poll_records_max
        )
        for tp, records in polled.items():
            store(tp.partition).restore([(r.key, r.value) for r in records], records[-1].offset + 1)
            progress.add(len(records))
        for tp in list(todo):
            position = await restore.position(tp)
            if position >= todo[tp]:
                store(tp.partition).restore([], position)
                del todo[tp]
    counts["recovered_records"] += progress.done
    progress.close()


class Unsettled(KafkaTimeoutError):  # type: ignore[misc]
    """A transaction stayed open on a changelog partition past the wait."""


async def _settled(
    bootstrap: str,
    restore: AIOKafkaConsumer,
    tps: list[TopicPartition],
    *,
    timeout_s: float,
    some: bool = False,
) -> dict[TopicPartition, int]:
    """The end of each changelog partition once no transaction is open on it: its last
    stable offset (what read_committed reads up to) equal to its high watermark.

    Only a shard's owner writes its changelog partition, so a transaction open on one
    when the shard is taken over is its previous owner's: one whose offsets the group
    has not accepted yet (its generation is checked when it sends them, and the new owner
    waits for those that were accepted, `group_commit.stable_committed`), or one it has
    committed whose marker has not reached this partition yet. Reading up to the last
    stable offset then would stop short of what that transaction decides, and serve the
    shard without it. Its coordinator ends it within the transaction timeout (aborting
    one left open); a longer wait raises Unsettled. With `some`, the partitions settled
    are returned as soon as there is one (the others are asked for again)."""
    deadline = time.monotonic() + timeout_s
    latest = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_uncommitted")
    await latest.start()
    try:
        while True:
            stable = await restore.end_offsets(tps)
            high = await latest.end_offsets(tps)
            open_ = sorted(tp.partition for tp in tps if stable[tp] < high[tp])
            if not open_ or (some and len(open_) < len(tps)):
                return {tp: stable[tp] for tp in tps if tp.partition not in open_}
            if time.monotonic() >= deadline:
                raise Unsettled(f"a transaction is still open on changelog partitions {open_}")
            await asyncio.sleep(settle_backoff_s)
    finally:
        await latest.stop()


def _start_of(p: int, store: ShardStore, end: int, counts: Counter[str]) -> int:
    """Where shard p's changelog is read from: the offset its store reached, or 0 for a
    store ahead of its changelog (a changelog recreated under it), which is wiped."""
    start = store.changelog_offset()
    if store.rebuilt:
        counts["rebuilt_shards"] += 1
        store.rebuilt = False  # counted once, not at every later take-over
    if start > end:
        log.warning("shard %d: local state is ahead of its changelog; wiped", p)
        store.wipe()
        start = 0
    return start


async def standby(
    bootstrap: str,
    changelog: str,
    *,
    lock: asyncio.Lock,
    stopping: asyncio.Event,
    busy: Callable[[], set[int]],
    placed: Callable[[], frozenset[int]],
    store: Callable[[int], ShardStore],
    counts: Counter[str],
) -> None:
    """Keep the shards the group placed here as standby copies (`placed()`, from the
    last assignment) warm: tail each one's changelog partition into its local store, so
    that when the shard is assigned here `recover` only reads what the standby had not
    seen yet. Records are applied under the engine's `lock` and only to shards not
    `busy()` (owned or being taken over); a shard being taken over is left alone (its
    recovery starts from the offset the standby copy reached, stored with the records
    in one write). Runs until `stopping` is set."""
    consumer = _changelog_reader(bootstrap)
    await consumer.start()
    tailing: set[int] = set()
    try:
        while not stopping.is_set():
            async with lock:
                want = set(placed()) - busy()
                if want != tailing:
                    tps = [TopicPartition(changelog, p) for p in sorted(want)]
                    consumer.assign(tps)
                    for tp in tps:
                        consumer.seek(tp, store(tp.partition).changelog_offset())
                    tailing = want
            if not tailing:
                await asyncio.sleep(standby_idle_s)
                continue
            polled = await consumer.getmany(
                timeout_ms=restore_poll_timeout_ms, max_records=restore_poll_records_max
            )
            async with lock:
                busy_now = busy()
                for tp, records in polled.items():
                    p = tp.partition
                    if not records or p in busy_now:
                        continue
                    shard = store(p)
                    start = shard.changelog_offset()
                    fresh = [(r.key, r.value) for r in records if r.offset >= start]
                    if fresh:
                        shard.restore(fresh, records[-1].offset + 1)
                        counts["standby_records"] += len(fresh)
    finally:
        await consumer.stop()
