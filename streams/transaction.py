"""One shard batch's Kafka transaction: the one place its commit order is written down.

A batch is decided before this is called: its outputs are in a list, the state it
changed is staged in the shard store's `pending` (latest value per key), and nothing has
reached Kafka or RocksDB. Then, in this order:

1. begin the shard's transaction (exactly-once; its producer is the shard's fenced
   transactional producer, see `streams.ownership`);
2. send the outputs: results to partition p of the events topic, credits and refunds to
   their payees' partitions of the internal topic, misplaced records forwarded to their
   account's partition, dead letters;
3. send the changelog: every key the batch changed, once, with its last value, to
   partition p of the changelog;
4. add the consumed offsets to the transaction (at-least-once: nothing yet);
5. wait until every record sent is acknowledged, and raise the first failure: aiokafka
   commits a transaction even when the broker refused one of its batches
   (MESSAGE_TOO_LARGE, say), so a refused record would otherwise be lost with its batch
   committed around it;
6. commit the transaction (at-least-once: commit the consumed offsets, after the
   outputs are acknowledged);
7. only then, back in `streams.loop`, write the batch to the local RocksDB with the
   changelog offset it reached, in one atomic write (`ShardStore.flush`).

So the outputs, the changelog and the consumed offsets of a batch are visible together or
not at all (read_committed), and a crash anywhere before 6 loses only what Kafka has not
committed: the batch is read again and finds the state exactly as it was before its first
attempt. A crash between 6 and 7 leaves RocksDB behind the changelog, which recovery
catches up. Any failure here leaves the caller to discard the staged state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import RecordMetadata, TopicPartition

from streams.records import Output


@dataclass(frozen=True)
class Written:
    """What a committed transaction tells the loop: where the shard's changelog partition
    ends now (None if the batch changed nothing), and the broker's answer for the batch's
    last record (for the clock check)."""

    changelog_next_offset: int | None
    last: RecordMetadata | None


async def commit(
    producer: AIOKafkaProducer,
    *,
    exactly_once: bool,
    outputs: list[Output],
    changelog: str,
    partition: int,
    changes: Iterable[tuple[bytes, bytes | None]],
    offsets: dict[TopicPartition, int],
    group_id: str,
    consumer: AIOKafkaConsumer | None,
) -> Written:
    """Write one shard batch (steps 1-6 of the module's docstring) and say what it wrote."""
    if exactly_once:
        await producer.begin_transaction()
    sent = [
        await producer.send(topic, value, key=key, partition=p, headers=headers)
        for topic, key, value, p, headers in outputs
    ]
    logged = [
        await producer.send(changelog, value, key=key, partition=partition)
        for key, value in changes
    ]
    if exactly_once:
        if offsets:
            await producer.send_offsets_to_transaction(offsets, group_id)
        await _delivered(producer, sent, logged)
        await producer.commit_transaction()
    else:
        await _delivered(producer, sent, logged)
        if offsets:
            assert consumer is not None
            await consumer.commit(offsets)
    ends = [f.result().offset for f in logged]
    last = logged[-1] if logged else (sent[-1] if sent else None)
    return Written(
        changelog_next_offset=max(ends) + 1 if ends else None,
        last=None if last is None else last.result(),
    )


async def _delivered(producer: AIOKafkaProducer, *futures: list[asyncio.Future[Any]]) -> None:
    """Wait until every send of a batch is acknowledged; raise the first failure. (A
    flush and a scan: gathering ten thousand futures costs ten times as much.)"""
    await producer.flush()
    failed: BaseException | None = None
    for group in futures:
        for future in group:
            if not future.done():
                await asyncio.wait([future])
            error = future.exception()  # retrieved, so none is logged as lost
            if failed is None and error is not None:
                failed = error
    if failed is not None:
        raise failed
