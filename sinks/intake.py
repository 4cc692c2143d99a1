"""From polled records to a batch: each event decoded (one already written, or past a
replay's end, skipped), and a dead letter for each that cannot be, or that its store
refuses. The letters are bounded like every dead letter (`topics.codec.dead_letter`):
a 1 MB event of 0xff escaped would be ~5 MB, a result of a 1,000-leg disbursement
re-encoded whole could pass the broker's limit."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiokafka.structs import TopicPartition

from sinks.batch import Batch
from topics.codec import dead_letter, decode_result, encode
from topics.schema import DeadLetter, Result


def decode(
    polled: dict[TopicPartition, list[Any]],
    *,
    topic: str,
    store_name: str,
    written: dict[TopicPartition, int],
    until: dict[int, int] | None,
) -> tuple[Batch, list[DeadLetter]]:
    """The batch of `polled` (partitions in order) and the dead letters of the events
    that do not decode. `written`: partition -> next offset already in the store (a
    record before it is a redelivery after a rebalance or seek); `until`: a replay's
    end offsets (records from there on are left out)."""
    batch = Batch(topic=topic)
    letters = []
    for tp, records in sorted(polled.items(), key=lambda kv: kv[0].partition):
        if until is not None:
            end = until.get(tp.partition, 0)
            records = [r for r in records if r.offset < end]
        expected = written.get(tp)
        for record in records:
            if expected is not None and record.offset < expected:
                continue  # written already (redelivered after a rebalance or seek)
            try:
                result = decode_result(record.value or b"")
            except msgspec.MsgspecError as exc:
                letters.append(undecodable(store_name, record, f"{exc}"))
                continue
            batch.events.append((tp.partition, result))
            batch.sources.append(record.offset)
        if records:
            batch.offsets[tp.partition] = max(
                records[-1].offset + 1, batch.offsets.get(tp.partition, 0)
            )
    return batch, letters


def undecodable(store_name: str, record: Any, reason: str) -> DeadLetter:
    """The dead letter of a record that is not an event of the schema."""
    return dead_letter(
        f"sink {store_name}: undecodable event: {reason}",
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        raw=record.value or b"",
        at_ms=int(time.time() * 1000),  # the sink's time: the record's is not ours
    )


def refused(
    store_name: str, topic: str, partition: int, offset: int, result: Result, why: str
) -> DeadLetter:
    """The dead letter of an event its store refuses for its content (`why`)."""
    return dead_letter(
        f"sink {store_name}: the store refused the event: {why}",
        topic=topic,
        partition=partition,
        offset=offset,
        key=result.account.encode(),
        raw=encode(result),
        at_ms=int(time.time() * 1000),
    )
