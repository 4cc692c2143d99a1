"""Taking newly assigned shards over (`streams.ownership.Shards.assigned`), outside the
rebalance callback: the callback returns at once, serving the kept shards; each new shard
stays paused and unserved until its take-over has read its committed offsets and caught
its state up, then is put at those offsets and served; a rebalance calls a take-over under
way off; a broker away is waited out; anything else is raised for the run to end with.

The broker side is replaced: the group's consumer by a fake that records pauses, resumes
and seeks, the committed-offset read and the changelog recovery by functions the test
controls. The real ones are tested on the broker (tests/fault/test_engine_recovery.py,
test_engine_crash.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition

from streams import ownership
from streams.ownership import Shards

T = "c.commands"


def _tps(*partitions: int) -> set[TopicPartition]:
    return {TopicPartition(T, p) for p in partitions}


class Consumer:
    """The group consumer as the shards use it: its assignment, generation, pauses,
    resumes and seeks."""

    def __init__(self, generation: int) -> None:
        self._coordinator = SimpleNamespace(generation=generation)
        self.tps: set[TopicPartition] = set()
        self.paused: set[TopicPartition] = set()
        self.seeks: dict[TopicPartition, int | None] = {}

    def assignment(self) -> set[TopicPartition]:
        return self.tps

    def pause(self, *tps: TopicPartition) -> None:
        self.paused |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused -= set(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp] = offset

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.seeks[tp] = None


class Broker:
    """What a take-over asks of Kafka: committed offsets (failing `fail_reads` times
    first, as a broker restarting does) and a recovery of each shard that waits for the
    test's go (`caught_up[p].set()`) and hands the shards to `ready` in that order."""

    def __init__(self, shards: Shards, *, committed: int | None = 5, fail_reads: int = 0) -> None:
        self.reads: list[list[int]] = []
        self.caught_up: dict[int, asyncio.Event] = {}
        self.committed = committed
        self.fail_reads = fail_reads
        self.producers = 0
        shards.new_producer = self.new_producer  # type: ignore[method-assign]
        shards._committed = self.read_committed  # type: ignore[method-assign]
        shards._recover = self.recover  # type: ignore[method-assign]
        self.shards = shards

    async def new_producer(self) -> None:
        self.producers += 1
        self.shards.producer = object()  # type: ignore[assignment]

    async def read_committed(self, tps: list[TopicPartition]) -> dict[Any, int | None]:
        self.reads.append(sorted(tp.partition for tp in tps))
        if len(self.reads) <= self.fail_reads:
            raise KafkaConnectionError("Connection at 127.0.0.1:9092 closed")
        return {tp: self.committed for tp in tps}

    def gate(self, p: int) -> asyncio.Event:
        return self.caught_up.setdefault(p, asyncio.Event())

    async def recover(self, shards: list[int], *, ready: Any = None) -> None:
        left = list(shards)
        while left:
            waits = {p: asyncio.ensure_future(self.gate(p).wait()) for p in left}
            await asyncio.wait(waits.values(), return_when=asyncio.FIRST_COMPLETED)
            group = [p for p in left if waits[p].done()]
            for p in left:
                waits[p].cancel()
            left = [p for p in left if p not in group]
            await ready(group)


def _shards(tmp_path: Any, consumer: Consumer) -> Shards:
    shards = Shards(
        bootstrap="127.0.0.1:1",
        group_id="g",
        changelog="c.changelog",
        data_dir=tmp_path,
        exactly_once=True,
        lock=asyncio.Lock(),
        stopping=asyncio.Event(),
        counts=Counter(),
        watchdog=SimpleNamespace(assigned=lambda *a: None, partitions=[]),  # type: ignore[arg-type]
        expiries=SimpleNamespace(rescan_soon=lambda: None),  # type: ignore[arg-type]
        instance_id="i",
    )
    shards.consumer = consumer  # type: ignore[assignment]
    return shards


async def _assign(shards: Shards, consumer: Consumer, *partitions: int) -> None:
    consumer.tps = _tps(*partitions)
    await shards.assigned(consumer.tps)


async def _spin() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ownership, "reclaim_backoff_first_s", 0.0)


async def test_the_callback_returns_before_the_take_over_and_each_shard_is_served_when_caught_up(
    tmp_path: Any,
) -> None:
    consumer = Consumer(generation=4)
    shards = _shards(tmp_path, consumer)
    broker = Broker(shards, committed=5)
    await asyncio.wait_for(_assign(shards, consumer, 0, 1), timeout=1)
    await _spin()
    # Nothing served, both paused, both recovering: not ready, nothing fetched for them.
    assert shards.owned == set()
    assert shards.recovering == {0, 1}
    assert consumer.paused == _tps(0, 1)
    assert broker.reads == [[0, 1]]
    broker.gate(1).set()
    await _spin()
    assert shards.owned == {1}
    assert shards.recovering == {0}
    assert consumer.paused == _tps(0)
    assert consumer.seeks == {TopicPartition(T, 1): 5}
    assert shards.next == {TopicPartition(T, 1): 5}
    broker.gate(0).set()
    await _spin()
    assert shards.owned == {0, 1}
    assert shards.recovering == set()
    assert consumer.paused == set()
    assert shards.next == {TopicPartition(T, 0): 5, TopicPartition(T, 1): 5}
    assert shards.counts["taken_shards"] == 2
    assert shards.taking is not None and shards.taking.done()
    shards.check()  # nothing to raise


async def test_a_shard_with_no_committed_offset_is_served_from_its_beginning(
    tmp_path: Any,
) -> None:
    consumer = Consumer(generation=1)
    shards = _shards(tmp_path, consumer)
    broker = Broker(shards, committed=None)
    broker.gate(0).set()
    await _assign(shards, consumer, 0)
    await _spin()
    assert shards.owned == {0}
    assert consumer.seeks == {TopicPartition(T, 0): None}
    assert shards.next == {}


async def test_kept_shards_are_served_while_the_new_ones_are_taken_over(tmp_path: Any) -> None:
    consumer = Consumer(generation=7)
    shards = _shards(tmp_path, consumer)
    broker = Broker(shards)
    broker.gate(0).set()
    await _assign(shards, consumer, 0)
    await _spin()
    assert shards.owned == {0}
    await shards.revoked(_tps(0))
    consumer._coordinator.generation = 8
    await asyncio.wait_for(_assign(shards, consumer, 0, 1), timeout=1)
    assert shards.owned == {0}  # kept, at once
    assert shards.recovering == {1}
    assert consumer.paused == _tps(1)
    # The lock is free while shard 1 is caught up: the batch loop and the views go on.
    await asyncio.wait_for(shards.lock.acquire(), timeout=1)
    shards.lock.release()
    broker.gate(1).set()
    await _spin()
    assert shards.owned == {0, 1}
    assert shards.counts["kept_shards"] == 1
    assert shards.counts["taken_shards"] == 2


async def test_a_rebalance_calls_a_take_over_off_and_serves_none_of_its_shards(
    tmp_path: Any,
) -> None:
    consumer = Consumer(generation=2)
    shards = _shards(tmp_path, consumer)
    Broker(shards)
    await _assign(shards, consumer, 0, 1)
    await _spin()
    task = shards.taking
    assert task is not None and not task.done()
    await asyncio.wait_for(shards.revoked(_tps(0, 1)), timeout=1)
    assert task.cancelled()
    assert shards.taking is None
    assert shards.owned == set()
    assert shards.held == set()  # never served: taken over afresh if they come back
    assert shards.recovering == set()
    assert shards.counts["taken_shards"] == 0


async def test_a_take_over_cut_off_by_the_broker_is_retried_until_its_shards_are_served(
    tmp_path: Any,
) -> None:
    """A broker restart in the middle of taking shards on (the offsets read fails) must
    not leave them assigned here and served by nobody."""
    consumer = Consumer(generation=3)
    shards = _shards(tmp_path, consumer)
    broker = Broker(shards, fail_reads=2)
    broker.gate(0).set()
    broker.gate(1).set()
    await _assign(shards, consumer, 0, 1)
    await _spin()
    assert broker.reads == [[0, 1], [0, 1], [0, 1]]
    assert broker.producers == 1  # made once, not once per attempt
    assert shards.owned == {0, 1}
    assert shards.recovering == set()
    assert shards.next == {TopicPartition(T, 0): 5, TopicPartition(T, 1): 5}


async def test_a_take_over_that_fails_for_another_reason_ends_the_run(tmp_path: Any) -> None:
    consumer = Consumer(generation=3)
    shards = _shards(tmp_path, consumer)
    broker = Broker(shards)

    async def broken(shards_: list[int], *, ready: Any = None) -> None:
        raise RuntimeError("rocksdb: Corruption: block checksum mismatch")

    shards._recover = broken  # type: ignore[method-assign]
    del broker
    await _assign(shards, consumer, 0)
    await _spin()
    assert shards.recovering == set()
    assert shards.owned == set()
    with pytest.raises(RuntimeError, match="Corruption"):
        shards.check()
    # Nor does a rebalance, or a new take-over, swallow it.
    await shards.revoked(_tps(0))
    await _assign(shards, consumer, 0, 1)
    with pytest.raises(RuntimeError, match="Corruption"):
        shards.check()


async def test_a_rebalance_does_not_keep_a_shard_whose_batch_failed_in_flight(
    tmp_path: Any,
) -> None:
    """`Shards.revoked` drains the transaction in flight first; a shard whose batch failed
    is neither kept through the rebalance nor served, so a new assignment takes it over
    afresh (its offsets read stable, recovered, from the committed offsets)."""
    consumer = Consumer(generation=7)
    shards = _shards(tmp_path, consumer)
    shards.owned = {0, 1, 2}

    async def drain() -> set[int]:
        return {1}

    shards.drain = drain  # type: ignore[method-assign]
    await shards.revoked(_tps(0, 1, 2))
    assert shards.held == {0, 2}
    assert shards.held_generation == 7
    assert shards.owned == set()
