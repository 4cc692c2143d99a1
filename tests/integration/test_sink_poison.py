"""No event stops a sink: events that break the schema's bounds (a time past the year
9999, a negative seq or held) and events a store refuses for their content are
dead-lettered by both sinks and by `tally replay`; the sinks go on, survive a restart,
and the stores hold every other event. Real Kafka, PostgreSQL and Redis."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from core.settings import Settings
from harness.collector import read_all
from harness.procs import run_cli
from replay.run import Replay
from sinks import service, verify
from sinks.pg import quote
from sinks.redis_store import balance_key
from sinks.runner import SinkRunner
from tests.integration.sink_support import running
from topics import limits
from topics.admin import ensure_topics
from topics.codec import decode_dead_letter
from topics.names import schema_name
from topics.shard import shard_of
from topics.specs import topics_for

PARTITIONS = 2
NOW_MS = 1_764_000_000_000


def _event(command_id: str, account: str, *, seq: int = 1, held: int = 0, at_ms: int = NOW_MS,
           available: int = 10) -> dict[str, Any]:  # fmt: skip
    """A deposit's result event as the engine writes it (a dict: the schema's structs
    refuse the bad values this test needs to put on the topic)."""
    return {
        "v": 1, "command_id": command_id, "account": account, "kind": "deposit",
        "status": "applied", "emitted": 0, "at_ms": at_ms,
        "entries": [{"account": account, "asset": "USD", "seq": seq, "available": available,
                     "held": held, "delta_available": available, "delta_held": 0}],
    }  # fmt: skip


async def _produce(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for e in events:
            await producer.send_and_wait(
                topic,
                msgspec.json.encode(e),
                key=e["account"].encode(),
                partition=shard_of(e["account"], PARTITIONS),
            )
    finally:
        await producer.stop()


async def _redis_balances(client: Any, prefix: str) -> dict[tuple[str, str], tuple[int, ...]]:
    """The balances in Redis (`verify.redis_balances`, but past the one key this test
    made a string)."""
    out = {}
    async for key in client.scan_iter(match=f"{prefix}:*:balance:*", count=1000):
        if await client.type(key) != b"hash":
            continue
        value = await client.hgetall(key)
        account, asset = key.decode().split(":balance:", 1)[1].rsplit(":", 1)
        out[(account, asset)] = tuple(int(value[f]) for f in (b"available", b"held", b"seq"))
    return out


async def _drain(*runners: SinkRunner) -> None:
    async with running(*runners):
        assert await verify.wait_drained(list(runners), timeout_s=60)


async def test_no_event_stops_a_sink_or_a_replay(settings: Settings, unique: str) -> None:
    prefix = f"poison-{unique}"
    local = msgspec.structs.replace(settings, topic_prefix=prefix, partitions=PARTITIONS)
    topics = topics_for(prefix, PARTITIONS)
    await ensure_topics(local.kafka_bootstrap, list(topics.all()))
    await service.prepare(local, "postgres")
    schema = schema_name(local)
    good = [f"ok-{unique}-{i}" for i in range(6)]
    pg_refuses, redis_refuses = f"pgno-{unique}", f"rdno-{unique}"
    # A value the schema allows but this PostgreSQL refuses (a constraint of its own), and
    # a key Redis holds with another type: the stores' own errors on one event's content.
    conn = await asyncpg.connect(local.pg_dsn)
    await conn.execute(
        f"ALTER TABLE {quote(schema)}.ledger_entries ADD CONSTRAINT refuse_one "
        f"CHECK (account <> '{pg_refuses}')"
    )
    await conn.close()
    client = aioredis.from_url(local.redis_url)
    shard = shard_of(redis_refuses, PARTITIONS)
    await client.set(balance_key(prefix, shard, redis_refuses, "USD"), "not a hash")
    events = [
        _event(f"c0-{unique}", good[0]),
        _event(f"c1-{unique}", f"y10k-{unique}", at_ms=253_402_300_800_000),  # year 10000
        _event(f"c2-{unique}", good[1]),
        _event(f"c3-{unique}", f"negseq-{unique}", seq=-1),
        _event(f"c4-{unique}", f"neghold-{unique}", held=-5),
        _event(f"c5-{unique}", f"huge-{unique}", available=limits.EVENT_AVAILABLE_MAX + 1),
        _event(f"c6-{unique}", pg_refuses),
        _event(f"c7-{unique}", good[2]),
        _event(f"c8-{unique}", redis_refuses),
        _event(f"c9-{unique}", good[3]),
        # A rejected record's result whose kind holds a NUL, which PostgreSQL text cannot.
        {"command_id": f"c10-{unique}", "account": good[0], "kind": "de\u0000p",
         "status": "rejected", "reason": "invalid_command", "at_ms": NOW_MS},
    ]  # fmt: skip
    try:
        await _produce(local.kafka_bootstrap, topics.events.name, events)
        pg, rd = service.runner_for(local, "postgres"), service.runner_for(local, "redis")
        await _drain(pg, rd)  # a sink that crashed fails the test here
        expected = {(a, "USD"): (10, 0, 1) for a in good[:4]}
        assert await verify.pg_balances(local.pg_dsn, schema) == {
            **expected,
            (redis_refuses, "USD"): (10, 0, 1),
        }
        assert await _redis_balances(client, prefix) == {
            **expected,
            (pg_refuses, "USD"): (10, 0, 1),
        }
        assert (pg.dead_lettered, pg.isolated) == (6, 2)
        assert (rd.dead_lettered, rd.isolated) == (5, 1)

        # A restart of each, and more events: they resume after what they wrote.
        more = [_event(f"m{i}-{unique}", good[4 + i]) for i in range(2)]
        await _produce(local.kafka_bootstrap, topics.events.name, more)
        pg2, rd2 = service.runner_for(local, "postgres"), service.runner_for(local, "redis")
        await _drain(pg2, rd2)
        expected.update({(a, "USD"): (10, 0, 1) for a in good[4:]})
        assert (pg2.dead_lettered, rd2.dead_lettered) == (0, 0)  # nothing read again
        pg_now = await verify.pg_balances(local.pg_dsn, schema)
        assert {k: v for k, v in pg_now.items() if k[0] != redis_refuses} == expected

        records, _ = await read_all(local.kafka_bootstrap, topics.dead_letter.name, PARTITIONS)
        letters = [decode_dead_letter(r.value) for r in records]
        by_sink = {
            name: [x for x in letters if x.reason.startswith(f"sink {name}:")]
            for name in ("postgres", "redis")
        }
        assert len(by_sink["postgres"]) == 6 and len(by_sink["redis"]) == 5, letters
        refused = [x for x in letters if "the store refused the event" in x.reason]
        assert sorted(x.key or "" for x in refused) == sorted([good[0], pg_refuses, redis_refuses])

        # Replays, into the full stores and through the command: done, the same letters
        # counted (not sent again), the stores unchanged.
        before_pg, before_rd = pg_now, await _redis_balances(client, prefix)
        for target in ("postgres", "redis"):
            summary = await Replay(local, target, force=True, tty=False, say=lambda _: None).run()
            assert summary.completed and summary.undecodable == {"postgres": 6, "redis": 5}[target]
        code, out, err = await run_cli(local, "replay", "--target", "postgres", "--force")
        assert code == 0 and "replay postgres: done" in out, err
        assert await verify.pg_balances(local.pg_dsn, schema) == before_pg
        assert await _redis_balances(client, prefix) == before_rd
        again, _ = await read_all(local.kafka_bootstrap, topics.dead_letter.name, PARTITIONS)
        assert len(again) == len(records)
    finally:
        await client.aclose()
        await verify.drop(local.pg_dsn, schema, local.redis_url, prefix)
