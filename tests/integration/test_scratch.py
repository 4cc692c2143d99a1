"""The scratch deployment the benchmarks, the chaos harness and the demo run in: made on
the way in (topics with the engine's changelog, the schema), and on the way out nothing
of it is left in Kafka, PostgreSQL or Redis, also when the run failed; `keep` keeps it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from core.settings import Settings
from harness.scratch import Scratch, deployment, scratch
from sinks import pg
from topics.names import changelog_name, engine_group, schema_name


async def _left(s: Settings) -> dict[str, Any]:
    """What of the deployment exists: its topics, its schema, its Redis keys."""
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        topics = sorted(t for t in await admin.list_topics() if t.startswith(s.topic_prefix))
    finally:
        await admin.close()
    conn = await pg.connect(s.pg_dsn, None)
    try:
        schema = await conn.fetchval(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema_name(s)
        )
    finally:
        await conn.close()
    client: Any = aioredis.from_url(s.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{s.topic_prefix}:*")]
    finally:
        await client.aclose()
    return {"topics": topics, "schema": schema, "keys": len(keys)}


NOTHING = {"topics": [], "schema": 0, "keys": 0}


async def _after_drop(s: Settings) -> dict[str, Any]:
    """What is left once the broker's metadata caught up with the deletes (bounded)."""
    for _ in range(50):
        if (left := await _left(s)) == NOTHING:
            break
        await asyncio.sleep(0.2)
    return left


async def _after_create(s: Settings, topics: int) -> dict[str, Any]:
    """What exists once the listing shows `topics` topics (bounded): on a cluster, the
    broker that answers may not have caught up with the creates yet (each follows the
    controller's metadata log at its own pace)."""
    for _ in range(50):
        if len((made := await _left(s))["topics"]) >= topics:
            break
        await asyncio.sleep(0.2)
    return made


async def _use(found: Scratch) -> None:
    """What a run leaves beyond what the helper made: a Redis key, a state directory."""
    s = found.settings
    client: Any = aioredis.from_url(s.redis_url)
    try:
        await client.set(f"{s.topic_prefix}:{{0}}:x", "1")
    finally:
        await client.aclose()
    assert found.data_dir is not None
    (found.data_dir / "shard-0").mkdir(parents=True)


async def test_a_scratch_deployment_is_made_and_leaves_nothing(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    async with scratch(
        settings, f"scr-{unique}", partitions=2, topics="engine", schema=True, data_dir=state
    ) as found:
        s = found.settings
        assert (s.topic_prefix, s.partitions) == (f"scr-{unique}", 2)
        made = await _after_create(s, 5)
        assert changelog_name(engine_group(s)) in made["topics"]
        assert len(made["topics"]) == 5 and made["schema"] == 1, made
        await _use(found)
    assert await _after_drop(s) == NOTHING
    assert not state.exists()


async def test_a_failed_run_is_dropped_too_and_keep_keeps_it(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    with pytest.raises(ZeroDivisionError):
        async with scratch(
            settings, f"scf-{unique}", topics="deployment", schema=True, data_dir=tmp_path / "a"
        ) as found:
            await _use(found)
            _ = 1 / 0
    assert await _after_drop(found.settings) == NOTHING
    async with scratch(
        settings, f"sck-{unique}", topics="deployment", data_dir=tmp_path / "b", keep=True
    ) as kept:
        await _use(kept)
    try:
        left = await _after_create(kept.settings, 4)
        assert len(left["topics"]) == 4 and left["keys"] == 1, left
        assert (tmp_path / "b" / "shard-0").is_dir()
    finally:
        await kept.drop()
    assert await _after_drop(kept.settings) == NOTHING


def test_the_deployment_it_is_made_from_is_refused(settings: Settings) -> None:
    for prefix in ("", settings.topic_prefix):
        with pytest.raises(ValueError, match="prefix of its own"):
            deployment(settings, prefix)
