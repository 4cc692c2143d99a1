"""Sinks against real Kafka, PostgreSQL and Redis: the stores agree with the engine,
the ledger and the breakpoints reproduce every balance, a replay from offset 0 changes
no byte, migrations are safe twice and concurrently, and garbage is dead-lettered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from core.settings import Settings
from harness.collector import read_all
from harness.procs import produce
from sinks import verify
from sinks.migrate import MIGRATIONS, migrate
from sinks.pg import quote
from sinks.redis_store import offset_key
from tests.integration.sink_support import PARTITIONS, deployment, running
from topics.codec import decode_dead_letter, encode
from topics.schema import Deposit


async def test_migrations_run_once_even_concurrently(settings: Settings, unique: str) -> None:
    schema = f"mig-{unique}"
    try:
        first, second = await asyncio.gather(
            migrate(settings.pg_dsn, schema, 4), migrate(settings.pg_dsn, schema, 4)
        )
        every = sorted(path.name for path in MIGRATIONS.glob("*.sql"))
        assert every[0] == "0001_projections.sql"
        assert sorted([first, second]) == [[], every]
        assert await migrate(settings.pg_dsn, schema, 4) == []
        conn = await asyncpg.connect(settings.pg_dsn)
        try:
            rows = await conn.fetch(f"SELECT version FROM {quote(schema)}.schema_migrations")
            parts = await conn.fetchval(
                "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent"
                " JOIN pg_namespace n ON n.oid = p.relnamespace"
                " WHERE n.nspname = $1 AND p.relkind = 'p'",
                schema,
            )
        finally:
            await conn.close()
        assert sorted(r["version"] for r in rows) == list(range(1, len(every) + 1))
        assert parts == 4 * 4  # four sharded tables, four shards
    finally:
        conn = await asyncpg.connect(settings.pg_dsn)
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote(schema)} CASCADE")
        await conn.close()


async def test_stores_agree_and_a_replay_changes_nothing(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    async with deployment(settings, unique, tmp_path) as d:
        s = d.settings
        pg, rd = d.runner("postgres"), d.runner("redis")
        async with running(pg, rd):
            await d.produce()
            events = await d.drained()
            # A poison record on the events topic must not stop the sinks.
            producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap)
            await producer.start()
            await producer.send_and_wait(d.engine.topics.events.name, b"{not json", partition=0)
            await producer.stop()
            assert await verify.wait_drained([pg, rd], timeout_s=60)
        found = await verify.agreement(s.pg_dsn, d.schema, s.redis_url, s.topic_prefix, events)
        assert all(c.ok for c in found), "\n".join(c.line() for c in found)
        assert pg.dead_lettered == 1 and rd.dead_lettered == 1
        assert d.collector.results.foreign == 1  # the poison record, seen but not a result
        dump_pg = await verify.pg_dump(s.pg_dsn, d.schema)
        dump_redis = await verify.redis_dump(s.redis_url, s.topic_prefix)
        assert len(dump_pg["breakpoints"]) > 0
        assert len(dump_pg["ledger_entries"]) == sum(
            len(r.entries) for g in d.collector.results.by_id.values() for r in g
        )

        # Replay the whole topic from offset 0 into the full stores: new consumer groups,
        # and the offsets both stores keep forgotten.
        conn = await asyncpg.connect(s.pg_dsn)
        await conn.execute(f"DELETE FROM {quote(d.schema)}.sink_offsets")
        await conn.close()
        client = aioredis.from_url(s.redis_url)
        await client.delete(*(offset_key(s.topic_prefix, p) for p in range(PARTITIONS)))
        await client.aclose()
        pg2 = d.runner("postgres", group=f"replay-pg-{unique}")
        rd2 = d.runner("redis", group=f"replay-rd-{unique}")
        async with running(pg2, rd2):
            assert await verify.wait_drained([pg2, rd2], timeout_s=120)
        assert pg2.written_events == pg.written_events > 0
        assert rd2.written_events == rd.written_events > 0
        assert await verify.pg_dump(s.pg_dsn, d.schema) == dump_pg
        assert await verify.redis_dump(s.redis_url, s.topic_prefix) == dump_redis


async def _forget_redis(settings: Settings) -> int:
    """What a FLUSHALL does to this deployment: every key of its prefix is gone (the
    other tests' keys in the shared Redis are left alone)."""
    client = aioredis.from_url(settings.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.topic_prefix}:*")]
        if keys:
            await client.delete(*keys)
        return len(keys)
    finally:
        await client.aclose()


async def test_a_redis_that_lost_its_data_is_rebuilt_by_the_live_sink(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    async with deployment(settings, unique, tmp_path, count=800) as d:
        s = d.settings
        rd = d.runner("redis")
        async with running(rd):
            await d.produce()
            events = await d.drained()
            # A poison event: dead-lettered once, however often a rebuild reads it again.
            producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap)
            await producer.start()
            await producer.send_and_wait(d.engine.topics.events.name, b"{not json", partition=0)
            await producer.stop()
            assert await verify.wait_drained([rd], timeout_s=60)
            before = await verify.redis_dump(s.redis_url, s.topic_prefix)
            assert before

            # Quiet partitions: nothing new arrives, the sink's probe notices.
            assert await _forget_redis(s) > 0
            deadline = asyncio.get_running_loop().time() + 30
            while await verify.redis_dump(s.redis_url, s.topic_prefix) != before:
                assert asyncio.get_running_loop().time() < deadline, "Redis never rebuilt"
                await asyncio.sleep(0.5)
            assert rd.rebuilds == 1

            # Under load: the first write after the loss notices it (the probe is off).
            rd._next_probe = float("inf")
            await _forget_redis(s)
            more = [
                (f"more-{unique}-{i}", encode(Deposit(
                    command_id=f"more-{unique}-{i}", account=f"more-{unique}-{i}", asset="USD",
                    amount=7)), None)
                for i in range(40)
            ]  # fmt: skip
            await produce(s.kafka_bootstrap, d.engine.topics.commands.name, more)
            expected = dict(events)
            expected.update({(f"more-{unique}-{i}", "USD"): (7, 0, 1) for i in range(40)})
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                found = await verify.redis_balances(s.redis_url, s.topic_prefix)
                if found == expected:
                    break
                assert asyncio.get_running_loop().time() < deadline, (
                    f"Redis not rebuilt: {len(found)} of {len(expected)} balances"
                )
                await asyncio.sleep(0.5)
            assert rd.rebuilds == 2

            # Back from an older snapshot: the progress is there but behind what was
            # written, and the balances with it. Noticed on the next write too.
            client = aioredis.from_url(s.redis_url)
            await _forget_redis(s)
            for p in range(PARTITIONS):
                await client.set(offset_key(s.topic_prefix, p), 1)
            await client.aclose()
            late = Deposit(command_id=f"late-{unique}", account=f"late-{unique}", asset="USD",
                           amount=3)  # fmt: skip
            await produce(s.kafka_bootstrap, d.engine.topics.commands.name,
                          [(late.account, encode(late), None)])  # fmt: skip
            expected[(f"late-{unique}", "USD")] = (3, 0, 1)
            deadline = asyncio.get_running_loop().time() + 60
            while await verify.redis_balances(s.redis_url, s.topic_prefix) != expected:
                assert asyncio.get_running_loop().time() < deadline, "Redis not rebuilt"
                await asyncio.sleep(0.5)
            assert rd.rebuilds == 3
        records, _ = await read_all(s.kafka_bootstrap, d.engine.topics.dead_letter.name, PARTITIONS)
        letters = [decode_dead_letter(r.value) for r in records]
        from_events = [x for x in letters if x.source_topic == d.engine.topics.events.name]
        assert len(from_events) == 1 and rd.dead_lettered == 4  # read 4 times, sent once
