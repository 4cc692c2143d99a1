"""`scripts/services.sh up` is idempotent: a second start reuses, never spawns a second server."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "services.sh"


def _count(pattern: str) -> int:
    found = subprocess.run(["pgrep", "-fc", pattern], capture_output=True, text=True)
    return int(found.stdout.strip() or 0)


def test_second_up_reuses_every_service() -> None:
    # The session fixture already needed the stack up, so this is at least the second start.
    done = subprocess.run([SCRIPT, "up"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    for service in ("kafka", "postgres", "redis"):
        assert any(
            line.startswith(f"{service}:") and "already running" in line for line in lines
        ), done.stdout
    # Exactly one of each on the machine, whichever checkout started it. (Not counting
    # the clusters beside them: scripts/kafka-cluster.sh's brokers run from
    # kafka-cluster/broker-N/server.properties, a Redis Cluster node's title ends in
    # "[cluster]".)
    assert _count(r"java .*kafka\.Kafka \S*/kafka/server\.properties") == 1
    assert _count(r"postgres -D ") == 1
    assert _count(r"redis-server 127\.0\.0\.1:[0-9]+$") == 1


async def test_status_reports_all_three_up_and_each_answers(settings: Settings) -> None:
    proc = await asyncio.create_subprocess_exec(
        SCRIPT, "status", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    raw_out, raw_err = await asyncio.wait_for(proc.communicate(), 60)
    out = raw_out.decode()
    assert proc.returncode == 0, out + raw_err.decode()
    said = {line.split(":", 1)[0]: line for line in out.splitlines() if ":" in line}
    for service in ("kafka", "postgres", "redis"):
        assert said.get(service, "").startswith(f"{service}: up"), out
    # "up" is only worth saying if each one answers its own protocol: a metadata round
    # trip to the broker, a query to PostgreSQL, a PING to Redis.
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        assert isinstance(await admin.list_topics(), list)
    finally:
        await admin.close()
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    r = aioredis.from_url(settings.redis_url)
    try:
        assert await r.ping() is True
    finally:
        await r.aclose()
