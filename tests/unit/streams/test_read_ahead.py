"""Reading ahead (`streams.loop.BatchLoop._read_ahead`): while the previous poll's
transaction commits, the next poll's records are read (`Records.read`), and then decided
with what was read, each record read once; reading stops when the transaction has
committed, and what was not read by then, or could not be read, is read when it is
decided. Nothing is read ahead with no transaction in flight.

The real `_decide` runs against a stand-in for `Records` that says what it was handed;
the transaction is released by the test."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.structs import TopicPartition

from streams import loop as loop_module
from streams.loop import Batch, BatchLoop

T = "c.commands"


def _poll(partition: int, *offsets: int) -> dict[Any, list[Any]]:
    return {
        TopicPartition(T, partition): [
            SimpleNamespace(topic=T, partition=partition, offset=o) for o in offsets
        ]
    }


class Reading:
    """Records that are read as ("read", offset); one offset cannot be read. Each record
    decided is noted with what it was handed (None: not read ahead)."""

    def __init__(self, unreadable: int | None = None) -> None:
        self.reads: list[int] = []
        self.handed: dict[int, Any] = {}
        self.unreadable = unreadable
        self.on_read: Any = None

    def read(self, record: Any) -> Any:
        self.reads.append(record.offset)
        if self.on_read is not None:
            self.on_read()
        if record.offset == self.unreadable:
            raise ValueError("cannot be read")
        return ("read", record.offset)

    def handle(
        self, p: int, store: Any, record: Any, now_ms: int, out: list[Any], read: Any = None
    ) -> None:
        self.handed[record.offset] = read
        out.append((T, b"k", b"v", p, None))


class Gated(BatchLoop):
    """The real `_decide`; transactions that commit when the test releases them."""

    def __init__(self, records: Reading) -> None:
        store = SimpleNamespace(changelog=lambda: [], discard=lambda: None)
        consumer = SimpleNamespace(
            assignment=lambda: set(),
            _subscription=SimpleNamespace(reassignment_in_progress=False),
            getmany=self._nothing_more,
        )
        shards = SimpleNamespace(
            owned={0}, stores={0: store}, producer=None, next={}, consumer=consumer
        )
        nothing_due = SimpleNamespace(due=lambda *a: {}, rescan_soon=lambda: None)
        super().__init__(
            shards=shards,  # type: ignore[arg-type]
            records=records,  # type: ignore[arg-type]
            expiries=nothing_due,  # type: ignore[arg-type]
            pruning=nothing_due,  # type: ignore[arg-type]
            exactly_once=False,
            group_id="g",
            changelog="c.changelog",
            counts=Counter(),
            poll_max_records=1000,
            now_ms=lambda: 0,
            time_ms=lambda p: 0,
            check_clock=lambda *a: None,
        )
        self.gates: list[asyncio.Future[None]] = []

    @staticmethod
    async def _nothing_more(**_: Any) -> dict[Any, list[Any]]:
        return {}

    async def _commit(self, batches: dict[int, Batch], decided: Any, times: Any) -> None:
        gate = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        await gate
        for batch in batches.values():
            self.shards.next.update(batch.offsets)


async def _spin() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_nothing_is_read_ahead_without_a_transaction_in_flight() -> None:
    records = Reading()
    loop = Gated(records)
    await loop.process(_poll(0, 1, 2))
    assert records.handed == {1: None, 2: None}  # read when decided, by `handle`
    assert records.reads == []
    await _spin()
    loop.gates[0].set_result(None)
    await loop.drain()


async def test_records_polled_while_a_transaction_commits_are_read_then_and_decided_so() -> None:
    records = Reading()
    loop = Gated(records)
    await loop.process(_poll(0, 1))
    await _spin()
    second = asyncio.create_task(loop.process(_poll(0, 2, 3, 4)))
    await _spin()
    assert records.reads == [2, 3, 4]  # read while the first transaction is in flight
    assert 2 not in records.handed  # but not decided before it commits
    loop.gates[0].set_result(None)
    await second
    assert records.handed == {1: None, 2: ("read", 2), 3: ("read", 3), 4: ("read", 4)}
    assert records.reads == [2, 3, 4]  # once each
    await _spin()
    loop.gates[1].set_result(None)
    await loop.drain()


async def test_a_record_that_cannot_be_read_ahead_is_read_when_it_is_decided() -> None:
    records = Reading(unreadable=3)
    loop = Gated(records)
    await loop.process(_poll(0, 1))
    await _spin()
    second = asyncio.create_task(loop.process(_poll(0, 2, 3, 4)))
    await _spin()
    loop.gates[0].set_result(None)
    await second
    assert records.handed[3] is None  # `handle` reads it, and deals with its error
    assert records.handed[2] == ("read", 2) and records.handed[4] == ("read", 4)
    await _spin()
    loop.gates[1].set_result(None)
    await loop.drain()


async def test_reading_ahead_stops_when_the_transaction_has_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loop_module, "read_ahead_chunk", 2)
    records = Reading()
    loop = Gated(records)
    await loop.process(_poll(0, 1))
    await _spin()
    # The first transaction commits while the first chunk (2 and 3) is being read.
    records.on_read = lambda: loop.gates[0].done() or loop.gates[0].set_result(None)
    await loop.process(_poll(0, 2, 3, 4, 5, 6))
    assert records.handed[2] == ("read", 2) and records.handed[3] == ("read", 3)
    assert [records.handed[o] for o in (4, 5, 6)] == [None, None, None]
    assert records.reads == [2, 3]
    await _spin()
    loop.gates[1].set_result(None)
    await loop.drain()
