"""The batch loop's scheduling (`streams.loop.BatchLoop.process`): a shard's batch commits
in the background, the other shards do not wait for it, the shard's own next batch does,
and a batch that failed in the background puts its shard back before anything polled
for it since is applied; a rebalance does not keep a shard whose batch failed in flight.

Only the scheduling is under test: `shard_batch` (decide + commit) is replaced by one
whose commits the test releases by hand, and `failed` by one that rewinds like the real
one does. The real commits, fencing and failures are tested on the broker
(tests/integration/test_engine.py, tests/fault)."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.structs import TopicPartition

from streams.loop import Batch, BatchLoop
from streams.timers import Prune
from topics.schema import Expire

T = "c.commands"


def _record(partition: int, offset: int) -> SimpleNamespace:
    return SimpleNamespace(topic=T, partition=partition, offset=offset)


def _poll(partition: int, *offsets: int) -> dict[Any, list[Any]]:
    return {TopicPartition(T, partition): [_record(partition, o) for o in offsets]}


class FakeConsumer:
    def __init__(self, partitions: list[int]) -> None:
        self.tps = {TopicPartition(T, p) for p in partitions}
        self.seeks: list[tuple[int, int]] = []

    def assignment(self) -> set[Any]:
        return self.tps

    def seek(self, tp: Any, offset: int) -> None:
        self.seeks.append((tp.partition, offset))


class GatedLoop(BatchLoop):
    """A loop whose batches commit when the test says so, and say so."""

    def __init__(self, partitions: list[int]) -> None:
        nothing_due = SimpleNamespace(due=lambda *a: {}, rescan_soon=lambda: None)
        shards = SimpleNamespace(
            owned=set(partitions),
            stores={p: None for p in partitions},
            producers={},
            next={},
            consumer=FakeConsumer(partitions),
        )
        super().__init__(
            shards=shards,  # type: ignore[arg-type]
            records=None,  # type: ignore[arg-type]
            expiries=nothing_due,  # type: ignore[arg-type]
            pruning=nothing_due,  # type: ignore[arg-type]
            exactly_once=True,
            group_id="g",
            changelog="c.changelog",
            counts=Counter(),
            now_ms=lambda: 0,
            time_ms=lambda p: 0,
            check_clock=lambda *a: None,
        )
        self.gates: dict[tuple[int, int], asyncio.Future[None]] = {}
        self.started: list[tuple[int, int]] = []
        self.committed: list[tuple[int, int]] = []
        self.failed_batches: list[tuple[int, int]] = []

    def gate(self, p: int, first: int) -> asyncio.Future[None]:
        return self.gates.setdefault((p, first), asyncio.get_running_loop().create_future())

    async def shard_batch(
        self,
        p: int,
        batch: Batch,
        expiries: list[Expire],
        prunes: Prune,
        *,
        without_outputs: BaseException | None = None,
    ) -> None:
        first = batch.records[0].offset
        self.started.append((p, first))
        await self.gate(p, first)  # raises what the test sets on it
        self.committed.append((p, first))
        self.shards.next.update(batch.offsets)

    async def failed(self, p: int, batch: Batch, error: BaseException) -> None:
        # As the real one does after an abort: back to the batch's first offsets.
        self.failed_batches.append((p, batch.records[0].offset))
        for tp, offset in batch.first.items():
            self.shards.next[tp] = offset


async def _spin() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_shard_commits_while_another_shards_batch_is_still_in_flight() -> None:
    loop = GatedLoop([0, 1])
    await loop.process(_poll(0, 10, 11))
    await _spin()
    assert loop.started == [(0, 10)]
    # Shard 0's commit hangs; the next poll's shard 1 goes on without it.
    await loop.process(_poll(1, 5))
    await _spin()
    loop.gate(1, 5).set_result(None)
    await _spin()
    assert loop.committed == [(1, 5)]
    assert (0, 10) not in loop.committed
    loop.gate(0, 10).set_result(None)
    assert await loop.drain() == set()
    assert loop.committed == [(1, 5), (0, 10)]


async def test_a_shards_next_batch_starts_only_after_its_batch_in_flight_committed() -> None:
    loop = GatedLoop([0])
    await loop.process(_poll(0, 10, 11))
    await _spin()
    polled = asyncio.create_task(loop.process(_poll(0, 12, 13)))
    await _spin()
    assert not polled.done()  # waiting for shard 0's first batch
    assert loop.started == [(0, 10)]
    loop.gate(0, 10).set_result(None)
    await polled
    await _spin()
    assert loop.started == [(0, 10), (0, 12)]
    loop.gate(0, 12).set_result(None)
    await loop.drain()
    assert loop.committed == [(0, 10), (0, 12)]


async def test_records_polled_behind_a_failed_batch_are_dropped_and_read_again() -> None:
    loop = GatedLoop([0])
    await loop.process(_poll(0, 10, 11))
    await _spin()
    loop.gate(0, 10).set_exception(ConnectionError("broker gone"))
    # The poll after it carries offsets 12, 13, fetched before the batch failed.
    await loop.process(_poll(0, 12, 13))
    await _spin()
    assert loop.failed_batches == [(0, 10)]
    assert loop.started == [(0, 10)]  # 12 and 13 were not applied over the gap
    assert loop.shards.consumer.seeks == [(0, 10)]  # read again from the failed batch
    assert loop.in_flight == {}


async def test_drain_waits_for_every_batch_and_names_the_failed_shards() -> None:
    loop = GatedLoop([0, 1, 2])
    await loop.process({**_poll(0, 1), **_poll(1, 1), **_poll(2, 1)})
    await _spin()
    drained = asyncio.create_task(loop.drain())
    await _spin()
    assert not drained.done()
    loop.gate(0, 1).set_result(None)
    loop.gate(1, 1).set_exception(TimeoutError())
    await _spin()
    assert not drained.done()
    loop.gate(2, 1).set_result(None)
    assert await drained == {1}
    assert sorted(loop.committed) == [(0, 1), (2, 1)]
    assert loop.failed_batches == []  # not retried while the group changes
    assert loop.counts["batches_failed"] == 1


async def test_a_failure_that_ends_the_worker_still_ends_it_from_the_background() -> None:
    loop = GatedLoop([0])

    async def give_up(p: int, batch: Batch, error: BaseException) -> None:
        raise error

    loop.failed = give_up  # type: ignore[method-assign]
    await loop.process(_poll(0, 1))
    await _spin()
    loop.gate(0, 1).set_exception(RuntimeError("disk broken"))
    await _spin()
    with pytest.raises(RuntimeError, match="disk broken"):
        await loop.process({})


class FakeProducer:
    def __init__(self) -> None:
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True


async def test_a_rebalance_does_not_keep_a_shard_whose_batch_failed_in_flight(
    tmp_path: Any,
) -> None:
    """`Shards.revoked` drains the batches in flight first; a shard whose batch failed is
    neither kept through the rebalance nor served, and its producer is gone, so a new
    assignment takes it over afresh (fenced, recovered, from the committed offsets)."""
    from streams.ownership import Shards

    watchdog = SimpleNamespace(assigned=lambda *a: None, partitions=[])
    shards = Shards(
        bootstrap="127.0.0.1:1",
        group_id="g",
        changelog="c.changelog",
        data_dir=tmp_path,
        exactly_once=True,
        lock=asyncio.Lock(),
        stopping=asyncio.Event(),
        counts=Counter(),
        watchdog=watchdog,  # type: ignore[arg-type]
        expiries=None,  # type: ignore[arg-type]
    )
    shards.consumer = SimpleNamespace(_coordinator=SimpleNamespace(generation=7))  # type: ignore[assignment]
    producers = {p: FakeProducer() for p in (0, 1, 2)}
    shards.producers = dict(producers)  # type: ignore[arg-type]
    shards.owned = {0, 1, 2}

    async def drain() -> set[int]:
        return {1}

    shards.drain = drain
    await shards.revoked({TopicPartition(T, p) for p in (0, 1, 2)})
    assert shards.held == {0, 2}
    assert shards.held_generation == 7
    assert shards.owned == set()
    assert 1 not in shards.producers and producers[1].stopped
    assert not producers[0].stopped and not producers[2].stopped
