"""A real round trip through the local stack: Kafka -> PostgreSQL -> Redis, checked end to end.

It proves the three services answer and that the project's own contract (schema, codec,
shard function) survives a trip through each: deposits are produced keyed by account,
consumed back, checked to sit on their account's shard, copied into PostgreSQL and
Redis, and the per-store totals must agree. It cleans up after itself.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from core.errors import FAILED
from core.settings import Settings
from harness.errors import HarnessError
from sinks import pg, redis_client
from topics.admin import ensure_topics
from topics.codec import decode_command, encode
from topics.names import replicas
from topics.producer import durable_producer
from topics.schema import Deposit
from topics.shard import shard_of
from topics.specs import DAY_MS, TopicSpec

consume_timeout_s = 60.0
produce_linger_ms = 5


@dataclass
class Stage:
    name: str
    records: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Report:
    topic: str
    stages: list[Stage] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    misplaced: int = 0

    @property
    def ok(self) -> bool:
        return self.misplaced == 0 and len(set(self.totals.values())) == 1


class RoundTripError(HarnessError):
    """A store did not give back what was put into it."""

    exit_code = FAILED  # a finding: the round trip ran


def _deposits(count: int, accounts: int, seed: int) -> list[Deposit]:
    rng = random.Random(seed)
    return [
        Deposit(
            command_id=f"rt-{seed}-{i}",
            account=f"acct-{rng.randrange(accounts)}",
            asset=rng.choice(("USD", "EUR", "BTC")),
            amount=rng.randrange(1, 1_000_000),
        )
        for i in range(count)
    ]


async def run(
    settings: Settings,
    *,
    count: int = 5000,
    accounts: int = 500,
    seed: int = 7,
    say: Callable[[str], None] = print,
) -> Report:
    """Run the round trip and return its report; raises RoundTripError on a mismatch."""
    topic = f"{settings.topic_prefix}.roundtrip-{uuid.uuid4().hex[:8]}"
    report = Report(topic=topic)
    deposits = _deposits(count, accounts, seed)
    report.totals["produced"] = sum(d.amount for d in deposits)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        # Through ensure_topics, as every topic of Tally: the configured replication,
        # checked against the cluster.
        await ensure_topics(
            settings.kafka_bootstrap,
            [
                TopicSpec(
                    name=topic,
                    partitions=settings.partitions,
                    cleanup_policy="delete",
                    retention_ms=DAY_MS,
                    replicas=replicas(settings),
                )
            ],
        )
        say(f"kafka: created topic {topic} with {settings.partitions} partitions")
        report.stages.append(await _produce(settings, topic, deposits))
        consumed, stage = await _consume(settings, topic, count)
        report.stages.append(stage)
        report.misplaced = sum(
            1 for part, dep in consumed if part != shard_of(dep.account, settings.partitions)
        )
        report.totals["kafka"] = sum(dep.amount for _, dep in consumed)
        total, stage = await _postgres(settings, [dep for _, dep in consumed])
        report.totals["postgres"] = total
        report.stages.append(stage)
        total, stage = await _redis(settings, topic, [dep for _, dep in consumed])
        report.totals["redis"] = total
        report.stages.append(stage)
    finally:
        await admin.delete_topics([topic])
        await admin.close()
    if not report.ok:
        raise RoundTripError(
            f"stores disagree: totals={report.totals} misplaced={report.misplaced}"
        )
    return report


async def _produce(settings: Settings, topic: str, deposits: list[Deposit]) -> Stage:
    producer = durable_producer(
        settings.kafka_bootstrap,
        linger_ms=produce_linger_ms,
    )
    await producer.start()
    started = time.perf_counter()
    try:
        futures = [
            await producer.send(topic, key=d.account.encode(), value=encode(d)) for d in deposits
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return Stage("kafka produce (acks=all)", len(deposits), time.perf_counter() - started)


async def _consume(
    settings: Settings, topic: str, count: int
) -> tuple[list[tuple[int, Deposit]], Stage]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    started = time.perf_counter()
    out: list[tuple[int, Deposit]] = []
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(settings.partitions)])
        deadline = time.monotonic() + consume_timeout_s
        while len(out) < count:
            if time.monotonic() > deadline:
                raise RoundTripError(f"consumed {len(out)} of {count} in {consume_timeout_s}s")
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for tp, records in batches.items():
                for record in records:
                    decoded = decode_command(record.value or b"")
                    if not isinstance(decoded, Deposit):
                        raise RoundTripError(f"offset {record.offset} did not decode: {decoded}")
                    out.append((tp.partition, decoded))
    finally:
        await consumer.stop()
    return out, Stage("kafka consume", len(out), time.perf_counter() - started)


async def _postgres(settings: Settings, deposits: list[Deposit]) -> tuple[int, Stage]:
    conn = await pg.connect(settings.pg_dsn, None)
    started = time.perf_counter()
    try:
        async with conn.transaction():
            await conn.execute(
                "CREATE TEMP TABLE roundtrip (command_id text PRIMARY KEY, account text,"
                " asset text, amount numeric) ON COMMIT DROP"
            )
            await conn.copy_records_to_table(
                "roundtrip",
                records=[(d.command_id, d.account, d.asset, d.amount) for d in deposits],
            )
            total = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM roundtrip")
    finally:
        await conn.close()
    return int(total), Stage("postgres COPY + sum", len(deposits), time.perf_counter() - started)


async def _redis(settings: Settings, topic: str, deposits: list[Deposit]) -> tuple[int, Stage]:
    client = redis_client.connect_to(settings)
    started = time.perf_counter()
    key = f"{topic}:{{0}}:amounts"
    try:
        async with client.pipeline(transaction=False) as pipe:
            for d in deposits:
                pipe.hset(key, d.command_id, d.amount)
            pipe.expire(key, 300)
            await pipe.execute()
        values = await client.hvals(key)
        await client.delete(key)
    finally:
        await client.aclose()
    total = sum(msgspec.json.decode(v, type=int) for v in values)
    return total, Stage("redis pipeline + read", len(deposits), time.perf_counter() - started)


def render(report: Report) -> str:
    """The round trip's summary as a small table."""
    lines = [f"round trip through {report.topic}", ""]
    lines.append(f"{'stage':<28}{'records':>9}{'seconds':>10}{'records/s':>12}")
    for s in report.stages:
        lines.append(f"{s.name:<28}{s.records:>9}{s.seconds:>10.3f}{s.rate:>12,.0f}")
    lines.append("")
    for store, total in report.totals.items():
        lines.append(f"total amount {store:<10}{total:>20}")
    lines.append(f"records on the wrong shard: {report.misplaced}")
    lines.append("RESULT: " + ("all stores agree" if report.ok else "MISMATCH"))
    return "\n".join(lines)
