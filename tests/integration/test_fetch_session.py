"""Incremental fetch sessions (`streams.fetch_session`) against the real broker: a
consumer fetching in sessions reads every record once and in order, while its requests
after the first name only the partitions that moved; a session the broker refuses (a
wrong epoch, an evicted id) is replaced by a full fetch and nothing is lost or read
twice; a consumer whose assignment changes mid-session keeps reading its new partitions."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from core.settings import Settings
from streams import kafka_internals
from streams.fetch_session import FetchSession
from topics.admin import delete_topics, ensure_topics
from topics.names import replicas
from topics.specs import TopicSpec

PARTITIONS = 16
ROUNDS = 30
read_timeout_s = 30.0


@contextlib.asynccontextmanager
async def _topic(settings: Settings, unique: str) -> AsyncIterator[str]:
    topic = f"fs-{unique}"
    spec = TopicSpec(
        name=topic, partitions=PARTITIONS, cleanup_policy="delete", retention_ms=-1,
        replicas=replicas(settings),
    )  # fmt: skip
    await ensure_topics(settings.kafka_bootstrap, [spec])
    try:
        yield topic
    finally:
        await delete_topics(settings.kafka_bootstrap, [topic])


class _Sent:
    """What each fetch request put on the wire (its session id, epoch and partitions)."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, int, int, int]] = []  # id, epoch, listed, forgotten
        self._build = kafka_internals.SessionFetchRequest.build

    def __enter__(self) -> _Sent:
        sent, build = self, self._build

        def recording(request: kafka_internals.SessionFetchRequest, struct: object) -> object:
            built = build(request, struct)
            plan = request.plan
            assert plan is not None, "the broker speaks fetch v7+, with sessions"
            forgotten = sum(len(p) for _, p in built.forgotten_topics_data)  # type: ignore[attr-defined]
            listed = sum(len(p) for _, p in built.topics)  # type: ignore[attr-defined]
            sent.requests.append((plan.session_id, plan.epoch, listed, forgotten))
            return built

        kafka_internals.SessionFetchRequest.build = recording  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        kafka_internals.SessionFetchRequest.build = self._build  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def _reading(
    settings: Settings, tps: list[TopicPartition]
) -> AsyncIterator[tuple[AIOKafkaProducer, AIOKafkaConsumer, dict[int, FetchSession] | None]]:
    """A producer, and a consumer fetching `tps` from offset 0 in fetch sessions (the
    sessions by broker, filled as its fetcher meets them)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_wait_ms=100,
    )
    await producer.start()
    try:
        await consumer.start()
        try:
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, 0)
            yield producer, consumer, kafka_internals.use_fetch_sessions(consumer)
        finally:
            await consumer.stop()
    finally:
        await producer.stop()


async def _read(
    consumer: AIOKafkaConsumer, got: dict[TopicPartition, list[bytes]], want: int
) -> None:
    deadline = time.monotonic() + read_timeout_s
    while sum(map(len, got.values())) < want:
        assert time.monotonic() < deadline, f"read {sum(map(len, got.values()))} of {want}"
        polled = await consumer.getmany(timeout_ms=100, max_records=50)
        for tp, records in polled.items():
            got.setdefault(tp, []).extend(r.value or b"" for r in records)


def _only_session(sessions: dict[int, FetchSession] | None) -> FetchSession:
    assert sessions is not None, "aiokafka's fetcher is not where use_fetch_sessions looks"
    assert len(sessions) == 1, sessions  # one broker
    return next(iter(sessions.values()))


async def test_a_session_consumer_reads_every_record_once_and_lists_only_what_moved(
    settings: Settings, unique: str
) -> None:
    """30 rounds, each producing to 2 of 16 partitions: every record is read once and in
    its partition's order, the broker gave a session (incremental requests were answered)
    and the incremental requests listed far fewer partitions than the 16 a full one does."""
    rng = random.Random(unique)
    expected: dict[TopicPartition, list[bytes]] = {}
    got: dict[TopicPartition, list[bytes]] = {}
    async with _topic(settings, unique) as topic:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        with _Sent() as sent:
            async with _reading(settings, tps) as (producer, consumer, sessions):
                for n in range(ROUNDS):
                    for p in rng.sample(range(PARTITIONS), 2):
                        for i in range(rng.randrange(1, 20)):
                            value = f"{n}-{p}-{i}".encode()
                            await producer.send(topic, value=value, partition=p)
                            expected.setdefault(TopicPartition(topic, p), []).append(value)
                    await producer.flush()
                    await _read(consumer, got, sum(map(len, expected.values())))
                await asyncio.sleep(0.3)  # nothing more arrives: no record is read twice
                got_late = await consumer.getmany(timeout_ms=300)
                session = _only_session(sessions)
                ended = session.ended  # before stop() cancels the fetch in flight
    assert not any(got_late.values())
    assert got == expected
    incremental = [r for r in sent.requests if r[0] != 0]
    assert session.incremental_requests > ROUNDS, (session.incremental_requests, sent.requests[:5])
    assert ended == 0
    assert sum(r[2] for r in incremental) / len(incremental) < PARTITIONS / 4, incremental[:20]


async def test_a_session_the_broker_refuses_is_replaced_and_nothing_is_lost(
    settings: Settings, unique: str
) -> None:
    """Mid-stream, the session's epoch is put out of step (as if a request had been lost)
    three times, and its id replaced by one the broker never gave (as if it had evicted
    the session) twice: the broker refuses each (INVALID_FETCH_SESSION_EPOCH,
    FETCH_SESSION_ID_NOT_FOUND), the consumer's next fetch is a full one in a new
    session, and every record is still read once."""
    expected: dict[TopicPartition, list[bytes]] = {}
    got: dict[TopicPartition, list[bytes]] = {}
    ids: set[int] = set()
    async with _topic(settings, unique) as topic:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        async with _reading(settings, tps) as (producer, consumer, sessions):
            for n in range(ROUNDS):
                if n % 6 in (0, 3) and n > 0:
                    session = _only_session(sessions)
                    assert session.id, "no session to spoil"
                    if n % 6 == 3:
                        session.epoch += 7  # the broker expects another epoch now
                    else:
                        session.id = 2**31 - 1 - n  # an id the broker never gave
                for p in (n % PARTITIONS, (n * 5) % PARTITIONS):
                    value = f"{n}-{p}".encode()
                    await producer.send(topic, value=value, partition=p)
                    expected.setdefault(TopicPartition(topic, p), []).append(value)
                await producer.flush()
                await _read(consumer, got, sum(map(len, expected.values())))
                ids.add(_only_session(sessions).id)
            got_late = await consumer.getmany(timeout_ms=300)
            ended = _only_session(sessions).ended  # before stop() cancels the fetch
    assert not any(got_late.values())
    assert got == expected
    assert ended >= 5, ended  # the broker refused every spoiled session
    assert len(ids - {0}) >= 5, ids  # and each refusal was followed by a new session


async def test_an_assignment_changed_mid_session_reads_the_new_partitions(
    settings: Settings, unique: str
) -> None:
    """Half the partitions are dropped and others taken mid-stream: the session forgets
    the dropped ones (no record of them is read after) and lists the new ones, whose
    records are all read."""
    async with _topic(settings, unique) as topic:
        first = [TopicPartition(topic, p) for p in range(PARTITIONS // 2)]
        second = [TopicPartition(topic, p) for p in range(PARTITIONS // 4, PARTITIONS)]
        got: dict[TopicPartition, list[bytes]] = {}
        async with _reading(settings, first) as (producer, consumer, sessions):
            for tp in first:
                await producer.send(topic, value=b"a", partition=tp.partition)
            await producer.flush()
            await _read(consumer, got, len(first))
            consumer.assign(second)
            for tp in second:
                consumer.seek(tp, 0)
            for tp in [TopicPartition(topic, p) for p in range(PARTITIONS)]:
                await producer.send(topic, value=b"b", partition=tp.partition)
            await producer.flush()
            after: dict[TopicPartition, list[bytes]] = {}
            # Each partition of `second` has its a (if it had one) and its b.
            await _read(consumer, after, sum(2 if tp in first else 1 for tp in second))
            await asyncio.sleep(0.3)
            late = await consumer.getmany(timeout_ms=300)
            session = _only_session(sessions)
            # Read before stop(), which cancels the fetch in flight and ends the session.
            held, incremental = set(session.partitions), session.incremental_requests
    assert not any(late.values())
    assert set(after) == set(second)
    for tp in second:
        assert after[tp] == ([b"a", b"b"] if tp in first else [b"b"]), tp
    assert incremental > 0
    # The dropped partitions left the session; what it holds now is of `second` only.
    assert held and held <= set(second), held
