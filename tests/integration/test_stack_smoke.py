"""The three real services answer, and the client libraries we pin work against them."""

from __future__ import annotations

import asyncio

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from core.settings import Settings
from harness import roundtrip
from topics.shard import shard_of


async def test_kafka_produce_consume_lands_on_the_murmur2_shard(
    settings: Settings, unique: str
) -> None:
    topic = f"test.smoke-{unique}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    sent = {f"acct-{i}": f"value-{i}".encode() for i in range(50)}
    try:
        for key, value in sent.items():
            await producer.send_and_wait(topic, key=key.encode(), value=value)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    got: dict[str, tuple[int, bytes]] = {}
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(4)])
        await consumer.seek_to_beginning()
        async with asyncio.timeout(30):
            while len(got) < len(sent):
                for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                    for r in records:
                        got[r.key.decode()] = (tp.partition, r.value)
    finally:
        await consumer.stop()
        await admin.delete_topics([topic])
        await admin.close()
    assert {k: v for k, (_, v) in got.items()} == sent
    # The producer's default partitioner and our shard function agree on every key.
    assert all(part == shard_of(key, 4) for key, (part, _) in got.items())


async def test_postgres_write_and_read_back(settings: Settings, unique: str) -> None:
    conn = await asyncpg.connect(settings.pg_dsn)
    table = f"smoke_{unique}"
    try:
        await conn.execute(f"CREATE TABLE {table} (k text PRIMARY KEY, v bigint NOT NULL)")
        await conn.copy_records_to_table(table, records=[(f"k{i}", 2**62 + i) for i in range(100)])
        total = await conn.fetchval(f"SELECT sum(v) FROM {table}")
        assert total == sum(2**62 + i for i in range(100))
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


async def test_redis_write_and_read_back(settings: Settings, unique: str) -> None:
    client = aioredis.from_url(settings.redis_url)
    key = f"test:{{0}}:smoke:{unique}"
    try:
        await client.hset(key, mapping={"available": 10, "held": 0, "seq": 1})
        assert await client.hgetall(key) == {b"available": b"10", b"held": b"0", b"seq": b"1"}
    finally:
        await client.delete(key)
        await client.aclose()


async def test_round_trip_job_agrees_across_stores(settings: Settings) -> None:
    report = await roundtrip.run(settings, count=2000, accounts=100, seed=3, say=lambda _: None)
    assert report.ok
    assert len(set(report.totals.values())) == 1
    assert [s.records for s in report.stages] == [2000, 2000, 2000, 2000]
