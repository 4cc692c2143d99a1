"""`tally replay` against real Kafka, PostgreSQL and Redis: each store, emptied, is
rebuilt byte for byte; the live sinks' offsets are left alone (Kafka) or only raised
(PostgreSQL), so the live sinks resume without rewriting or skipping; a replay beside a
live sink is refused unless forced; an unreachable store or Kafka fails fast."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from audit.run import Audit, render
from bench.events import result_events
from core.settings import Settings
from harness.procs import produce, run_cli
from replay.checks import kafka_check_timeout_s
from replay.run import Replay
from sinks import service, verify
from sinks.pg import quote
from tests.integration.sink_support import PARTITIONS, Deployment, deployment, running
from topics.admin import ensure_topics
from topics.names import deployment_topics, schema_name, sink_group
from topics.specs import topics_for

# What every replay command here must finish within; the fast failures within less.
command_timeout_s = 60.0
# A replay that cannot start gives up by itself (the stores bound their connection
# attempts at 5 s, the Kafka check at `kafka_check_timeout_s`) and says why; this bound
# is generous on top of those and only turns a hang into a failure that says so.
fast_failure_s = kafka_check_timeout_s + 30
EXTRA_EVENTS = 40


@contextlib.asynccontextmanager
async def _pg(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(
        settings.pg_dsn, server_settings={"search_path": quote(schema_name(settings))}
    )
    try:
        yield conn
    finally:
        await conn.close()


async def _sink_offsets(settings: Settings) -> dict[str, dict[int, int]]:
    async with _pg(settings) as conn:
        rows = await conn.fetch("SELECT topic, partition, next_offset FROM sink_offsets")
    out: dict[str, dict[int, int]] = {}
    for r in rows:
        out.setdefault(r["topic"], {})[r["partition"]] = r["next_offset"]
    return out


async def _committed(settings: Settings) -> dict[str, dict[int, int]]:
    """Both sink groups' committed offsets in Kafka."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        out = {}
        for target in service.TARGETS:
            offsets = await admin.list_consumer_group_offsets(sink_group(settings, target))
            out[target] = {tp.partition: meta.offset for tp, meta in offsets.items()}
        return out
    finally:
        await admin.close()


async def _ends(settings: Settings) -> dict[int, int]:
    topic = deployment_topics(settings).events.name
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        ends = await consumer.end_offsets(
            [TopicPartition(topic, p) for p in range(settings.partitions)]
        )
        return {tp.partition: o for tp, o in ends.items()}
    finally:
        await consumer.stop()


async def _flush_redis(settings: Settings) -> None:
    client = aioredis.from_url(settings.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.topic_prefix}:*")]
        assert keys
        await client.delete(*keys)
    finally:
        await client.aclose()


async def _audit_clean(s: Settings, d: Deployment) -> None:
    """`tally audit` over PostgreSQL, Redis and the engine's tables finds nothing."""
    report = await Audit(s, engine_url=f"http://127.0.0.1:{d.engine.port}", say=lambda _: None,
                         progress_tty=False).run()  # fmt: skip
    assert report.ok and report.balances > 0, render(report)
    assert set(report.sources) >= {"redis", "engine"}, report.sources


async def test_replay_rebuilds_each_store_and_the_live_sinks_resume(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    async with deployment(settings, unique, tmp_path) as d:
        s = d.settings
        pg, rd = await d.project()
        dump_pg = await verify.pg_dump(s.pg_dsn, d.schema)
        dump_redis = await verify.redis_dump(s.redis_url, s.topic_prefix)
        offsets_before = await _sink_offsets(s)
        committed_before = await _committed(s)
        ends = await _ends(s)

        # (1) Redis emptied, rebuilt by the command in a process of its own.
        await _flush_redis(s)
        code, out, err = await run_cli(
            s, "replay", "--target", "redis", timeout_s=command_timeout_s
        )
        assert code == 0, err
        assert "replay redis: done" in out and f"{rd.written_events:,}" in out
        assert "replay redis: done, " in err  # the progress display's closing line
        assert await verify.redis_dump(s.redis_url, s.topic_prefix) == dump_redis
        same = verify.compare(
            "Redis = PostgreSQL",
            await verify.pg_balances(s.pg_dsn, d.schema),
            await verify.redis_balances(s.redis_url, s.topic_prefix),
        )
        assert same.ok and same.compared > 0, same.line()
        await _audit_clean(s, d)

        # (2) PostgreSQL emptied, sink_offsets too: the projection and the offsets are
        # one state (offsets left behind would say rows are there that are not).
        async with _pg(s) as conn:
            await conn.execute(
                "TRUNCATE balances, ledger_entries, command_results, breakpoints, sink_offsets"
            )
        lines: list[str] = []
        # In-process, with the deployment's store (breakpoints every 5th seq).
        summary = await Replay(
            s, "postgres", store=d.runner("postgres").store, say=lines.append, tty=False
        ).run()
        assert summary.completed and lines[-1].startswith("replay postgres: done, ")
        assert (summary.events, summary.entries) == (pg.written_events, pg.written_entries)
        assert await verify.pg_dump(s.pg_dsn, d.schema) == dump_pg
        await _audit_clean(s, d)
        # The live sink's offsets: raised to the end offsets taken at the start, which is
        # at least where it was (it stops after the last event; the end may lie past a
        # transaction marker); the replay's own progress rows are gone.
        offsets_after = await _sink_offsets(s)
        assert list(offsets_after) == [d.engine.topics.events.name]
        after = offsets_after[d.engine.topics.events.name]
        before = offsets_before[d.engine.topics.events.name]
        assert after == ends and all(after[p] >= o for p, o in before.items())
        # Neither replay moved either group's committed offsets in Kafka.
        assert await _committed(s) == committed_before

        # (3) The live sinks resume: new events only, nothing rewritten, nothing skipped.
        extra = result_events(EXTRA_EVENTS, 4, int(time.time() * 1000))
        topic = d.engine.topics.events.name
        await produce(s.kafka_bootstrap, topic, [(key, value, None) for key, value in extra])
        pg2, rd2 = d.runner("postgres"), d.runner("redis")
        async with running(pg2, rd2):
            assert await verify.wait_drained([pg2, rd2], timeout_s=60)
        assert pg2.written_events == rd2.written_events == EXTRA_EVENTS
        pg_now = await verify.pg_balances(s.pg_dsn, d.schema)
        rd_now = await verify.redis_balances(s.redis_url, s.topic_prefix)
        assert pg_now == rd_now and pg_now[("bench-0", "USD")][2] == EXTRA_EVENTS // 4


async def _wait_assigned(runner: service.SinkRunner, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while runner.consumer is None or not runner.consumer.assignment():
        assert time.monotonic() < deadline, "the live sink never joined its group"
        await asyncio.sleep(0.1)


async def test_replay_beside_a_live_sink_is_refused_unless_forced(
    settings: Settings, unique: str
) -> None:
    local = msgspec.structs.replace(settings, topic_prefix=f"rp-{unique}", partitions=PARTITIONS)
    await service.prepare(local, "postgres")
    try:
        live = service.runner_for(local, "postgres")
        async with running(live):
            await _wait_assigned(live)
            code, out, err = await run_cli(
                local, "replay", "--target", "postgres", timeout_s=command_timeout_s
            )
            assert code == 2 and out == ""
            assert err.count("\n") == 1, err
            assert f"consumer group rp-{unique}-sink-postgres has 1 live member" in err
            assert "--force" in err
            # The Redis store has no live sink: not refused.
            code, out, err = await run_cli(
                local, "replay", "--target", "redis", timeout_s=command_timeout_s
            )
            assert code == 0 and "replay redis: done" in out, err
            forced = await Replay(local, "postgres", force=True, tty=False, say=print).run()
            assert forced.completed and forced.events == 0
    finally:
        await verify.drop(local.pg_dsn, schema_name(local), local.redis_url, local.topic_prefix)


async def test_an_unreachable_store_or_kafka_fails_fast_naming_it(
    settings: Settings, unique: str
) -> None:
    local = msgspec.structs.replace(settings, topic_prefix=f"rx-{unique}", partitions=PARTITIONS)
    await ensure_topics(
        local.kafka_bootstrap, list(topics_for(local.topic_prefix, PARTITIONS).all())
    )
    cases = [
        ("postgres", {"pg_dsn": "postgresql://postgres@127.0.0.1:1/tally"},
         "PostgreSQL unreachable: PostgreSQL schema"),
        ("redis", {"redis_url": "redis://127.0.0.1:1/0"}, "Redis unreachable: Redis keys"),
        ("redis", {"kafka_bootstrap": "127.0.0.1:1"}, "Kafka unreachable at 127.0.0.1:1"),
    ]  # fmt: skip
    for target, change, says in cases:
        try:
            code, out, err = await run_cli(
                msgspec.structs.replace(local, **change),
                "replay",
                "--target",
                target,
                timeout_s=fast_failure_s,
            )
        except TimeoutError:
            pytest.fail(
                f"tally replay --target {target} with {change} did not give up by itself"
                f" in {fast_failure_s:.0f}s: it hangs instead of failing fast"
            )
        assert code == 2 and out == "", err
        assert err.count("\n") == 1 and err.startswith(f"tally replay: {says}"), err
        assert ":1" in err  # the address it could not reach
