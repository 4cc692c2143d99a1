"""A shard batch's transaction (`streams.transaction`) against the real broker: its outputs
and changelog leave as Kafka batches, one per partition (and more when one fills), and
every record arrives once, in its order within its partition, with the consumed offsets
committed in the same transaction."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as Errors

from core.settings import Settings
from streams import transaction
from streams.group_commit import MemberOffsets
from streams.kafka_internals import GroupMember
from streams.records import Output
from topics.admin import delete_topics, ensure_topics
from topics.names import replicas
from topics.specs import TopicSpec

PARTITIONS = 3


class CountingProducer(AIOKafkaProducer):  # type: ignore[misc]
    """The real producer, counting the batches it is handed per (topic, partition)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.batches: dict[tuple[str, int], int] = {}

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
        key = (topic, partition)
        self.batches[key] = self.batches.get(key, 0) + 1
        return await super().send_batch(batch, topic, partition=partition)


@contextlib.asynccontextmanager
async def _topics(settings: Settings, unique: str) -> AsyncIterator[tuple[str, str, str]]:
    """An outputs topic, a changelog and a source topic of PARTITIONS partitions each,
    deleted afterwards."""
    names = tuple(f"tx-{unique}.{n}" for n in ("out", "changelog", "in"))
    specs = [
        TopicSpec(
            name=name,
            partitions=PARTITIONS,
            cleanup_policy="delete",
            retention_ms=-1,
            replicas=replicas(settings),
        )
        for name in names
    ]
    await ensure_topics(settings.kafka_bootstrap, specs)
    try:
        yield names[0], names[1], names[2]
    finally:
        await delete_topics(settings.kafka_bootstrap, list(names))


def _transactional(
    cls: type[AIOKafkaProducer], settings: Settings, unique: str, **options: Any
) -> AIOKafkaProducer:
    """A transactional producer as the worker's is (acks=all, idempotent)."""
    return cls(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        transactional_id=f"tx-{unique}",
        **options,
    )


async def _read(bootstrap: str, topic: str) -> dict[int, list[tuple[bytes | None, bytes | None]]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        got: dict[int, list[tuple[bytes | None, bytes | None]]] = {p: [] for p in range(PARTITIONS)}
        for _ in range(100):
            positions = [await consumer.position(tp) for tp in tps]
            if all(at >= ends[tp] for at, tp in zip(positions, tps, strict=True)):
                break
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                got[tp.partition] += [(r.key, r.value) for r in records]
        return got
    finally:
        await consumer.stop()


async def test_outputs_and_changelog_leave_as_batches_that_fill_and_arrive_in_order(
    settings: Settings, unique: str
) -> None:
    """With a small max_batch_size, every partition's records fill several batches: each
    full one is sent and a new one started, no record is lost or repeated, the order
    within a partition holds, and the changelog's end is where the next batch of the
    shard's changelog will start."""
    async with _topics(settings, unique) as (out_topic, changelog, source):
        producer = _transactional(CountingProducer, settings, unique, max_batch_size=2048)
        member = MemberOffsets(producer)
        # A group nobody has joined takes offsets from generation -1 and no member id.
        nobody = GroupMember(-1, "", None)
        await producer.start()
        try:
            outputs: list[Output] = [
                (out_topic, b"k%d" % i, b"v%d-" % i + b"x" * 200, i % PARTITIONS,
                 [("tally-source", b"0:%d" % i)] if i % 2 else None)
                for i in range(120)
            ]  # fmt: skip
            changes = [(b"c|%d" % i, None if i % 7 == 0 else b"state-%d" % i) for i in range(50)]
            # Two shards' batches in one transaction, as one poll's are.
            other = [(b"c|two-%d" % i, b"s%d" % i) for i in range(5)]
            offsets = {TopicPartition(source, 1): 17, TopicPartition(source, 2): 4}
            written = await transaction.commit(
                producer,
                exactly_once=True,
                outputs=outputs,
                changelog=changelog,
                changes={1: changes, 2: other},
                offsets=offsets,
                group_id=f"tx-{unique}",
                member=member,
                as_member=nobody,
                consumer=None,
            )
            # 40 records of ~220 bytes per partition fill a 2 KiB batch several times over.
            filled = {p: producer.batches[(out_topic, p)] for p in range(PARTITIONS)}
            assert all(n >= 3 for n in filled.values()), filled
            assert producer.batches[(changelog, 1)] >= 1
            # The same shard's next transaction: its changelog continues where this one ended.
            again = await transaction.commit(
                producer,
                exactly_once=True,
                outputs=[],
                changelog=changelog,
                changes={1: [(b"c|again", b"1")]},
                offsets={},
                group_id=f"tx-{unique}",
                member=member,
                as_member=nobody,
                consumer=None,
            )
        finally:
            await producer.stop()
        got = await _read(settings.kafka_bootstrap, out_topic)
        for p in range(PARTITIONS):
            assert got[p] == [(k, v) for _, k, v, q, _ in outputs if q == p]
        logged = await _read(settings.kafka_bootstrap, changelog)
        assert logged[1] == [*changes, (b"c|again", b"1")]
        assert logged[2] == other
        assert logged[0] == []
        # 50 records then a commit marker: the next transaction's first record is at 51.
        assert written.changelog_next_offset == {1: 50, 2: 5}
        assert again.changelog_next_offset == {1: 52}
        assert written.last is not None and written.last.topic == changelog
        committed = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, group_id=f"tx-{unique}"
        )
        await committed.start()
        try:
            assert await committed.committed(TopicPartition(source, 1)) == 17
            assert await committed.committed(TopicPartition(source, 2)) == 4
        finally:
            await committed.stop()


async def test_back_to_back_transactions_are_never_refused_a_partition_check(
    settings: Settings, unique: str
) -> None:
    """Transactions one right after another, as the worker's are, each with records on
    every partition and consumed offsets: no produce request or offset commit is refused
    a partition, in particular none NOT_ENOUGH_REPLICAS or COORDINATOR_LOAD_IN_PROGRESS,
    which is how Kafka >= 3.8 refuses a check that a partition is in the transaction
    when it meets another change or check of the same transaction
    (`streams.transaction`). Each such refusal costs the transaction the producer's
    retry backoff."""
    async with _topics(settings, unique) as (out_topic, changelog, source):
        producer = _transactional(AIOKafkaProducer, settings, unique, retry_backoff_ms=10)
        member = MemberOffsets(producer)
        nobody = GroupMember(-1, "", None)
        refused: list[str] = []
        watching = {"produce": "ProduceRequest", "offsets": "TxnOffsetCommitRequest"}
        answered = dict.fromkeys(watching, 0)
        await producer.start()
        send = producer.client.send

        async def watched(node_id: int, request: Any, *args: Any, **kwargs: Any) -> Any:
            response = await send(node_id, request, *args, **kwargs)
            name = type(request).__name__
            kind = next((k for k, prefix in watching.items() if name.startswith(prefix)), None)
            if kind is not None:  # both answers: topics of (partition, error_code, ...)
                answered[kind] += 1
                codes = [part[1] for topic in response.topics for part in topic[1]]
                refused.extend(f"{kind} {Errors.for_code(c).__name__}" for c in codes if c)
            return response

        async def one(n: int) -> None:
            await transaction.commit(
                producer,
                exactly_once=True,
                outputs=[(out_topic, b"k", b"v%d" % n, p, None) for p in range(PARTITIONS)],
                changelog=changelog,
                changes={n % PARTITIONS: [(b"c|%d" % n, b"s")]},
                offsets={TopicPartition(source, n % PARTITIONS): n + 1},
                group_id=f"tx-{unique}",
                member=member,
                as_member=nobody,
                consumer=None,
            )

        try:
            await one(0)  # not watched: the new topics' leaders may still be moving in
            producer.client.send = watched
            for n in range(1, 151):
                await one(n)
        finally:
            producer.client.send = send
            await producer.stop()
    assert refused == []
    assert answered["produce"] >= 150 and answered["offsets"] == 150, answered
