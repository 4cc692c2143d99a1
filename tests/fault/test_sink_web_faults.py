"""A sink whose store is down is not ready: its /readyz turns 503 while PostgreSQL is
stopped, and 200 again once it is back (this test stops the real PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import msgspec

from core.settings import Settings
from harness import faults
from harness.procs import SinkProcess
from sinks import verify
from topics.names import schema_name

PARTITIONS = 4


async def _readyz(url: str) -> tuple[int, dict[str, object]]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{url}/readyz") as response,
    ):
        return response.status, await response.json(content_type=None)


async def _until_status(url: str, status: int, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got, body = await _readyz(url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            got, body = -1, {"error": repr(exc)}
        if got == status or time.monotonic() > deadline:
            assert got == status, (got, body)
            return body
        await asyncio.sleep(0.3)


async def test_postgres_sink_is_not_ready_while_postgres_is_down(
    settings: Settings, unique: str, tmp_path: Path, local_postgres: faults.PgCluster
) -> None:
    prefix = f"ready-{unique}"
    local = msgspec.structs.replace(settings, topic_prefix=prefix, partitions=PARTITIONS)
    sink = SinkProcess(settings, "postgres", prefix=prefix, log_path=tmp_path / "sink.log",
                       partitions=PARTITIONS)  # fmt: skip
    await sink.start()
    stopped = restarted = False
    try:
        await _until_status(sink.url, 200, 30)
        await faults.stop_postgres(local_postgres)
        stopped = True
        body = await _until_status(sink.url, 503, 30)
        assert body["checks"]["store"] != "ok", body  # type: ignore[index]
        assert body["checks"]["consumer"] == "ok", body  # type: ignore[index]
        # Alive all the same: a restart would not bring PostgreSQL back.
        async with aiohttp.ClientSession() as session, session.get(f"{sink.url}/livez") as r:
            assert r.status == 200
        await faults.start_postgres(local_postgres)
        restarted = True
        await _until_status(sink.url, 200, 60)
    finally:
        if stopped and not restarted:
            await faults.start_postgres(local_postgres)
        await sink.stop()
        await verify.drop(local.pg_dsn, schema_name(local), local.redis_url, prefix)
