"""The batch loop's scheduling (`streams.loop.BatchLoop.process`): one poll's shards
commit in one transaction, in the background; the next poll's batches are decided only
once it committed; a transaction that failed in the background puts its shards back
before anything polled for them since is applied; a shard whose records fail to decide
is isolated alone, after the others committed; timers on a shard with no offsets wait; a
transaction the group refused gives its shards up; a rebalance does not keep a shard
whose batch failed in flight; records fetched while a transaction commits join the next
poll's batches, except behind a failed transaction or during a rebalance.

Only the scheduling is under test: `_decide` and `_commit` are replaced by ones whose
commits the test releases by hand, and `failed` by one that rewinds like the real one
does. The real commits, fencing and failures are tested on the broker
(tests/integration/test_engine.py, test_group_commit.py, tests/fault)."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.structs import TopicPartition

from streams.group_commit import StaleMember
from streams.loop import Batch, BatchLoop, RecordFault

T = "c.commands"


def _record(partition: int, offset: int) -> SimpleNamespace:
    return SimpleNamespace(topic=T, partition=partition, offset=offset)


def _poll(partition: int, *offsets: int) -> dict[Any, list[Any]]:
    return {TopicPartition(T, partition): [_record(partition, o) for o in offsets]}


class FakeConsumer:
    """Assigned `partitions`; `fetched` holds what it has fetched and not yet returned,
    as aiokafka's buffer does (`getmany` with no timeout returns it at once)."""

    def __init__(self, partitions: list[int]) -> None:
        self.tps = {TopicPartition(T, p) for p in partitions}
        self.seeks: list[tuple[int, int]] = []
        self.positions: dict[Any, int] = {}
        self.fetched: list[Any] = []
        self._subscription = SimpleNamespace(reassignment_in_progress=False)

    def assignment(self) -> set[Any]:
        return self.tps

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        assert timeout_ms == 0  # the loop never waits for records under the lock
        taken, self.fetched = self.fetched[:max_records], self.fetched[max_records:]
        polled: dict[Any, list[Any]] = {}
        for record in taken:
            polled.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
        return polled

    def seek(self, tp: Any, offset: int) -> None:
        self.seeks.append((tp.partition, offset))
        self.positions[tp] = offset


Key = frozenset[tuple[int, int]]


def _key(*shards: tuple[int, int]) -> Key:
    """A transaction, by its shards and the first offset of each one's batch (-1: none)."""
    return frozenset(shards)


class GatedLoop(BatchLoop):
    """A loop whose transactions commit when the test says so, and say so."""

    def __init__(
        self,
        partitions: list[int],
        due: dict[int, list[Any]] | None = None,
        poll_max_records: int = 1000,
    ) -> None:
        self.rescans = 0

        def rescan() -> None:
            self.rescans += 1

        expiries = SimpleNamespace(due=lambda *a: dict(due or {}), rescan_soon=rescan)
        nothing_due = SimpleNamespace(due=lambda *a: {}, rescan_soon=lambda: None)
        shards = SimpleNamespace(
            owned=set(partitions),
            stores={p: None for p in partitions},
            producer=None,
            next={},
            consumer=FakeConsumer(partitions),
            given_up=[],
        )
        shards.give_up = lambda ps: (
            shards.given_up.append(sorted(ps)),
            shards.owned.difference_update(ps),
        )
        super().__init__(
            shards=shards,  # type: ignore[arg-type]
            records=None,  # type: ignore[arg-type]
            expiries=expiries,  # type: ignore[arg-type]
            pruning=nothing_due,  # type: ignore[arg-type]
            exactly_once=False,  # nothing to abort: `failed` is the test's
            group_id="g",
            changelog="c.changelog",
            counts=Counter(),
            poll_max_records=poll_max_records,
            now_ms=lambda: 0,
            time_ms=lambda p: 0,
            check_clock=lambda *a: None,
        )
        self.gates: dict[Key, asyncio.Future[None]] = {}
        self.decided: list[tuple[int, int]] = []
        self.offsets_decided: list[tuple[int, list[int]]] = []
        self.started: list[Key] = []
        self.committed: list[Key] = []
        self.failed_batches: list[Key] = []
        self.isolated: list[tuple[int, int]] = []
        self.poison: set[tuple[int, int]] = set()

    def gate(self, key: Key) -> asyncio.Future[None]:
        return self.gates.setdefault(key, asyncio.get_running_loop().create_future())

    def _decide(self, p: int, batch: Batch, *args: Any) -> Any:
        first = batch.records[0].offset if batch.records else -1
        if (p, first) in self.poison:
            raise RecordFault("a record that cannot be decided")
        self.decided.append((p, first))
        self.offsets_decided.append((p, [r.offset for r in batch.records]))
        return [], []

    @staticmethod
    def _of(batches: dict[int, Batch]) -> Key:
        return _key(*((p, b.records[0].offset if b.records else -1) for p, b in batches.items()))

    async def _commit(self, batches: dict[int, Batch], decided: Any, times: Any) -> None:
        key = self._of(batches)
        self.started.append(key)
        await self.gate(key)  # raises what the test sets on it
        self.committed.append(key)
        for batch in batches.values():
            self.shards.next.update(batch.offsets)

    async def failed(self, batches: dict[int, Batch], error: BaseException) -> None:
        # As the real one does after an abort: back to the batches' first offsets.
        self.failed_batches.append(self._of(batches))
        for batch in batches.values():
            for tp, offset in batch.first.items():
                self.shards.next[tp] = offset

    async def isolate(self, p: int, batch: Batch, error: BaseException, **_: Any) -> None:
        self.isolated.append((p, batch.records[0].offset))
        self.shards.next.update(batch.offsets)


async def _spin() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_polls_shards_commit_in_one_transaction_in_the_background() -> None:
    loop = GatedLoop([0, 1])
    await loop.process({**_poll(0, 10, 11), **_poll(1, 5)})
    await _spin()
    assert loop.started == [_key((0, 10), (1, 5))]
    assert loop.committed == []  # process returned with it in flight
    loop.gate(_key((0, 10), (1, 5))).set_result(None)
    assert await loop.drain() == set()
    assert loop.committed == [_key((0, 10), (1, 5))]


async def test_the_next_polls_batches_are_decided_only_after_the_transaction_committed() -> None:
    loop = GatedLoop([0, 1])
    await loop.process(_poll(0, 10, 11))
    await _spin()
    polled = asyncio.create_task(loop.process({**_poll(0, 12, 13), **_poll(1, 5)}))
    await _spin()
    assert not polled.done()  # waiting for the first poll's transaction
    assert loop.decided == [(0, 10)]  # shard 1's batch too: it is decided on committed state
    loop.gate(_key((0, 10))).set_result(None)
    await polled
    await _spin()
    assert loop.decided == [(0, 10), (0, 12), (1, 5)]
    loop.gate(_key((0, 12), (1, 5))).set_result(None)
    await loop.drain()
    assert loop.committed == [_key((0, 10)), _key((0, 12), (1, 5))]


async def test_the_time_spent_waiting_for_the_transaction_in_flight_is_counted() -> None:
    loop = GatedLoop([0])
    await loop.process(_poll(0, 10))
    await _spin()
    polled = asyncio.create_task(loop.process(_poll(0, 11)))
    await asyncio.sleep(0.05)
    loop.gate(_key((0, 10))).set_result(None)
    await polled
    assert 0.045 <= loop.commit_wait_s < 5
    assert not loop.counts  # a time, not a record or an outcome
    loop.gate(_key((0, 11))).set_result(None)
    await loop.drain()


async def test_records_polled_behind_a_failed_transaction_are_dropped_and_read_again() -> None:
    loop = GatedLoop([0, 1])
    await loop.process({**_poll(0, 10, 11), **_poll(1, 3)})
    await _spin()
    loop.gate(_key((0, 10), (1, 3))).set_exception(ConnectionError("broker gone"))
    # The poll after it carries offsets fetched before the transaction failed.
    await loop.process({**_poll(0, 12, 13), **_poll(1, 4)})
    await _spin()
    assert loop.failed_batches == [_key((0, 10), (1, 3))]
    assert loop.decided == [(0, 10), (1, 3)]  # 12, 13 and 4 were not applied over the gap
    assert sorted(loop.shards.consumer.seeks) == [(0, 10), (1, 3)]  # read again
    assert loop.in_flight is None


async def test_a_partition_first_read_behind_a_failed_transaction_is_read_again() -> None:
    """Shard 0's internal partition has no committed offset (the shard never had a
    credit) and gets its first record in the poll behind a failed transaction: dropped
    with that poll, it must be read again, or the next batch commits past it and the
    credit is never applied."""
    internal = TopicPartition("c.internal", 0)
    loop = GatedLoop([0])
    await loop.process(_poll(0, 10))
    await _spin()
    loop.gate(_key((0, 10))).set_exception(ConnectionError("broker gone"))
    credit = SimpleNamespace(topic="c.internal", partition=0, offset=0)
    await loop.process({**_poll(0, 11), internal: [credit]})
    await _spin()
    assert loop.decided == [(0, 10)]
    assert loop.shards.consumer.positions == {TopicPartition(T, 0): 10, internal: 0}


async def test_drain_waits_for_the_transaction_and_names_its_shards_when_it_failed() -> None:
    loop = GatedLoop([0, 1, 2])
    await loop.process({**_poll(0, 1), **_poll(1, 1), **_poll(2, 1)})
    await _spin()
    drained = asyncio.create_task(loop.drain())
    await _spin()
    assert not drained.done()
    loop.gate(_key((0, 1), (1, 1), (2, 1))).set_exception(TimeoutError())
    assert await drained == {0, 1, 2}
    assert loop.failed_batches == []  # not retried while the group changes
    assert loop.counts["batches_failed"] == 1


async def test_a_failure_that_ends_the_worker_still_ends_it_from_the_background() -> None:
    loop = GatedLoop([0])

    async def give_up(batches: dict[int, Batch], error: BaseException) -> None:
        raise error

    loop.failed = give_up  # type: ignore[method-assign]
    await loop.process(_poll(0, 1))
    await _spin()
    loop.gate(_key((0, 1))).set_exception(RuntimeError("disk broken"))
    await _spin()
    with pytest.raises(RuntimeError, match="disk broken"):
        await loop.process({})


async def test_a_shard_that_fails_to_decide_is_isolated_alone_after_the_others_commit() -> None:
    loop = GatedLoop([0, 1])
    loop.poison = {(1, 7)}
    polled = asyncio.create_task(loop.process({**_poll(0, 2), **_poll(1, 7, 8)}))
    await _spin()
    assert loop.started == [_key((0, 2))]  # shard 1 is not in the poll's transaction
    assert loop.isolated == []  # and waits for it: isolation uses the same producer
    loop.gate(_key((0, 2))).set_result(None)
    await polled
    assert loop.isolated == [(1, 7)]
    assert loop.committed == [_key((0, 2))]


async def test_timers_on_a_shard_without_offsets_wait_for_a_later_poll() -> None:
    expire = object()  # what is due does not matter: `_decide` is the test's
    loop = GatedLoop([0, 1], due={0: [expire], 1: [expire]})
    loop.shards.next[TopicPartition(T, 1)] = 40  # shard 1 consumed before; shard 0 never
    await loop.process({})
    await _spin()
    # Shard 1's expiry goes, with its offsets; shard 0's would carry none: not now.
    assert loop.started == [_key((1, -1))]
    assert loop.rescans == 1
    loop.gate(_key((1, -1))).set_result(None)
    await loop.drain()


async def test_a_transaction_the_group_refused_gives_its_shards_up_without_a_retry() -> None:
    loop = GatedLoop([0, 1, 2])
    await loop.process({**_poll(0, 1), **_poll(1, 1)})
    await _spin()
    loop.gate(_key((0, 1), (1, 1))).set_exception(StaleMember("ILLEGAL_GENERATION"))
    await loop.process({**_poll(0, 2), **_poll(2, 9)})
    await _spin()
    assert loop.shards.given_up == [[0, 1]]
    assert loop.failed_batches == []
    assert loop.shards.owned == {2}
    # The same poll's records of a shard given up are not applied; the others' are.
    assert loop.started[-1] == _key((2, 9))
    loop.gate(_key((2, 9))).set_result(None)
    await loop.drain()


async def test_records_fetched_while_the_transaction_commits_join_the_next_polls_batches() -> None:
    loop = GatedLoop([0, 1, 2])
    await loop.process(_poll(0, 10))
    await _spin()
    polled = asyncio.create_task(loop.process(_poll(0, 11)))
    await _spin()
    # Fetched while the first transaction is in flight: the same shard's next records
    # and a shard the poll had none of.
    loop.shards.consumer.fetched = [_record(0, 12), _record(0, 13), _record(2, 4)]
    loop.gate(_key((0, 10))).set_result(None)
    await polled
    assert loop.offsets_decided[1:] == [(0, [11, 12, 13]), (2, [4])]
    assert loop.started[-1] == _key((0, 11), (2, 4))
    assert loop.in_flight is not None
    assert loop.in_flight.batches[0].offsets == {TopicPartition(T, 0): 14}
    loop.gate(_key((0, 11), (2, 4))).set_result(None)
    await loop.drain()


async def test_no_more_records_are_taken_than_a_poll_holds() -> None:
    loop = GatedLoop([0], poll_max_records=3)
    loop.shards.consumer.fetched = [_record(0, o) for o in (12, 13, 14, 15)]
    await loop.process(_poll(0, 10, 11))
    await _spin()
    assert loop.offsets_decided == [(0, [10, 11, 12])]
    assert [r.offset for r in loop.shards.consumer.fetched] == [13, 14, 15]
    loop.gate(_key((0, 10))).set_result(None)
    await loop.drain()


async def test_nothing_fetched_is_taken_behind_a_failed_transaction() -> None:
    """Its shards were put back at their next offsets: what the consumer holds beyond is
    stale, and taking it would advance the positions past records never applied."""
    loop = GatedLoop([0, 1])
    await loop.process({**_poll(0, 10), **_poll(1, 3)})
    await _spin()
    loop.gate(_key((0, 10), (1, 3))).set_exception(ConnectionError("broker gone"))
    loop.shards.consumer.fetched = [_record(0, 11), _record(1, 4)]
    await loop.process({})
    await _spin()
    assert len(loop.shards.consumer.fetched) == 2
    assert loop.decided == [(0, 10), (1, 3)]


async def test_nothing_fetched_is_taken_during_a_rebalance() -> None:
    loop = GatedLoop([0])
    loop.shards.consumer._subscription.reassignment_in_progress = True
    loop.shards.consumer.fetched = [_record(0, 11)]
    await loop.process(_poll(0, 10))
    await _spin()
    assert loop.offsets_decided == [(0, [10])]
    assert len(loop.shards.consumer.fetched) == 1
    loop.gate(_key((0, 10))).set_result(None)
    await loop.drain()


async def test_a_view_reads_only_once_the_transaction_in_flight_has_reached_the_stores() -> None:
    """Read-your-writes: a committed result is visible to clients before its batch reaches
    RocksDB (that happens after the commit, in the background), so a strong read waits
    for the transaction in flight (`quiet`, used by `Engine.reading`)."""
    loop = GatedLoop([0])
    await loop.process(_poll(0, 4))
    await _spin()
    reading = asyncio.create_task(loop.quiet())
    await _spin()
    assert not reading.done()
    loop.gate(_key((0, 4))).set_result(None)
    await reading
    assert loop.committed == [_key((0, 4))]
    assert loop.in_flight is not None  # its outcome is still the next poll's to handle
    await loop.drain()
