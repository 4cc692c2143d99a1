"""One shard batch's Kafka transaction: the one place its commit order is written down.

A batch is decided before this is called: its outputs are in a list, the state it
changed is staged in the shard store's `pending` (latest value per key), and nothing has
reached Kafka or RocksDB. Then, in this order:

1. begin the shard's transaction (exactly-once; its producer is the shard's fenced
   transactional producer, see `streams.ownership`);
2. send the outputs, one Kafka batch per output partition (`_send`): results to
   partition p of the events topic, credits and refunds to their payees' partitions of
   the internal topic, misplaced records forwarded to their account's partition, dead
   letters;
3. send the changelog: every key the batch changed, once, with its last value, to
   partition p of the changelog, as one batch (or more, when one fills);
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

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import RecordTooLargeError
from aiokafka.producer.message_accumulator import BatchBuilder
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
    sent = await _send(producer, outputs)
    logged = await _send(producer, ((changelog, k, v, partition, None) for k, v in changes))
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
    # The changelog's batches all go to one partition, in order: the last one ends it.
    last = logged[-1] if logged else (sent[-1] if sent else None)
    return Written(
        changelog_next_offset=logged[-1].next_offset() if logged else None,
        last=None if last is None else last.future.result(),
    )


@dataclass(frozen=True)
class _Sent:
    """One batch handed to the producer: its delivery future (the broker's answer for
    the batch: its base offset, and its append time on a LogAppendTime topic) and how
    many records it holds."""

    future: asyncio.Future[RecordMetadata]
    records: int

    def next_offset(self) -> int:
        return int(self.future.result().offset) + self.records


async def _send(
    producer: AIOKafkaProducer,
    records: Iterable[tuple[str, bytes | None, bytes | None, int, list[tuple[str, bytes]] | None]],
) -> list[_Sent]:
    """Send (topic, key, value, partition, headers) records as one Kafka batch per
    partition, in their order within each partition. A batch that fills (the producer's
    max_batch_size; a record alone always fits, and `records.check_sizes` keeps every
    record under limits.OUTPUT_BYTES_MAX, below the broker's message limit) is sent at
    once and a new one started. Building the batches here instead of `producer.send` per
    record saves the producer's per-record futures and bookkeeping, the most expensive
    part of a batch after deciding it."""
    building: dict[tuple[str, int], BatchBuilder] = {}
    sent: list[_Sent] = []
    for topic, key, value, partition, headers in records:
        builder = building.get((topic, partition))
        if builder is None:
            builder = building[(topic, partition)] = producer.create_batch()
        if builder.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
            sent.append(await _send_batch(producer, builder, topic, partition))
            builder = building[(topic, partition)] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
                raise RecordTooLargeError(f"a record that fits no batch for {topic}")
    for (topic, partition), builder in building.items():
        sent.append(await _send_batch(producer, builder, topic, partition))
    return sent


async def _send_batch(
    producer: AIOKafkaProducer, builder: BatchBuilder, topic: str, partition: int
) -> _Sent:
    # Closed, the batch leaves without waiting for the producer's linger.
    builder.close()
    future = await producer.send_batch(builder, topic, partition=partition)
    return _Sent(future, builder.record_count())


async def _delivered(producer: AIOKafkaProducer, *batches: list[_Sent]) -> None:
    """Wait until every batch sent is acknowledged; raise the first failure."""
    await producer.flush()
    failed: BaseException | None = None
    for group in batches:
        for batch in group:
            if not batch.future.done():
                await asyncio.wait([batch.future])
            error = batch.future.exception()  # retrieved, so none is logged as lost
            if failed is None and error is not None:
                failed = error
    if failed is not None:
        raise failed
