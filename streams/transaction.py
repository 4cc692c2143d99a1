"""One poll's Kafka transaction: the one place its commit order is written down.

The batches of a poll (one per shard with work, see `streams.loop`) are decided before
this is called: their outputs are in a list, the state each changed is staged in its
shard store's `pending` (latest value per key), and nothing has reached Kafka or RocksDB.
Then, in this order:

1. begin the worker's transaction (exactly-once; its producer is the worker's one
   transactional producer, see `streams.ownership`);
2. send the outputs, one Kafka batch per output partition (`_send`): results to
   partition p of the events topic, credits and refunds to their payees' partitions of
   the internal topic, misplaced records forwarded to their account's partition, dead
   letters;
3. send the changelog: every key each batch changed, once, with its last value, to its
   shard's partition of the changelog, as one batch per partition (or more, when one
   fills);
4. wait until every record sent is acknowledged, and raise the first failure: aiokafka
   commits a transaction even when the broker refused one of its batches
   (MESSAGE_TOO_LARGE, say), so a refused record would otherwise be lost with its batch
   committed around it;
5. add the consumed offsets to the transaction as the group member the batches were
   decided by, its generation checked by the group coordinator (`streams.group_commit`):
   a worker the group has moved past is refused here, and its transaction aborted
   (at-least-once: nothing yet);
6. commit the transaction (at-least-once: commit the consumed offsets, after the
   outputs are acknowledged);
7. only then, back in `streams.loop`, write each batch to its shard's local RocksDB with
   the changelog offset it reached, in one atomic write (`ShardStore.flush`).

So the outputs, the changelog and the consumed offsets of a poll are visible together or
not at all (read_committed), and a crash anywhere before 6 loses only what Kafka has not
committed: the batch is read again and finds the state exactly as it was before its first
attempt. A crash between 6 and 7 leaves RocksDB behind the changelog, which recovery
catches up. Any failure here leaves the caller to discard the staged state.

Offsets after the records, not beside them (as aiokafka would send them): a broker from
Kafka 3.8 on checks with the transaction coordinator that a partition is in the
transaction before it appends the transaction's first batch to it (KIP-890), and it
checks the offsets' partition the same way before it takes them. A check made while
the coordinator adds the offsets' partition (AddOffsetsToTxn), or while the same
broker is checking another part of the same transaction, is refused as retriable
(NOT_ENOUGH_REPLICAS to the produce, COORDINATOR_LOAD_IN_PROGRESS to the offsets), and
aiokafka retries it after its backoff (10 ms, see `streams.ownership`). Sent beside
each other, 82 of 1,589 produce requests and 44 of 1,588 offset commits were refused so
at 200 commands/s on 8 partitions, and 64 and 23 of ~1,490 over a whole
`TALLY_PARTITIONS=64 tally bench engine --count 100000` (instrumented); the slowest
transactions were those. In this order, none in either (and none in two more paced
runs of the code as it is). The produce's round trip is now before the offsets'
instead of beside them; the paced p99 produce->result latency of five
`tally bench engine --count 50000` runs alternated with the old order was 27.9-43.7 ms
against 30.8-47.5.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import RecordTooLargeError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import RecordMetadata, TopicPartition

from streams.group_commit import MemberOffsets, StaleMember
from streams.kafka_internals import GroupMember
from streams.records import Output


@dataclass(frozen=True)
class Written:
    """What a committed transaction tells the loop: where each changed shard's changelog
    partition ends now (a shard whose batch changed nothing is not in it), and the
    broker's answer for the transaction's last record (for the clock check)."""

    changelog_next_offset: dict[int, int]
    last: RecordMetadata | None


async def commit(
    producer: AIOKafkaProducer,
    *,
    exactly_once: bool,
    outputs: list[Output],
    changelog: str,
    changes: dict[int, list[tuple[bytes, bytes | None]]],
    offsets: dict[TopicPartition, int],
    group_id: str,
    member: MemberOffsets | None,
    as_member: GroupMember | None,
    consumer: AIOKafkaConsumer | None,
) -> Written:
    """Write the batches of one poll, of one shard or more (steps 1-6 of the module's
    docstring), and say what they wrote. Exactly-once, the consumed offsets go with the
    group member `as_member` (`streams.group_commit`): a transaction the group refuses
    them for fails with StaleMember, before it commits."""
    if exactly_once:
        if as_member is None or member is None:
            raise StaleMember("not a member of the group: no transaction is begun")
        member.member = as_member
        await producer.begin_transaction()
    sent = await _send(producer, outputs)
    logged = await _send(
        producer, ((changelog, k, v, p, None) for p, kv in changes.items() for k, v in kv)
    )
    if exactly_once:
        await _delivered(producer, sent, logged)
        if offsets:
            await producer.send_offsets_to_transaction(offsets, group_id)
        await producer.commit_transaction()
    else:
        await _delivered(producer, sent, logged)
        if offsets:
            assert consumer is not None
            await consumer.commit(offsets)
    # Each changelog partition's batches are sent in order: its last one ends it.
    ends = {batch.partition: batch.next_offset() for batch in logged}
    last = logged[-1] if logged else (sent[-1] if sent else None)
    return Written(
        changelog_next_offset=ends,
        last=None if last is None else last.future.result(),
    )


@dataclass(frozen=True)
class _Sent:
    """One batch handed to the producer: its delivery future (the broker's answer for
    the batch: its base offset, and its append time on a LogAppendTime topic), its
    partition and how many records it holds."""

    future: asyncio.Future[RecordMetadata]
    partition: int
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
    return _Sent(future, partition, builder.record_count())


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
