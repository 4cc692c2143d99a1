"""Integration tests talk to the real local stack; they fail loudly when it is not up."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from core.settings import Settings
from harness.procs import EngineProcess

ENGINE_PARTITIONS = 4


@pytest.fixture
async def engine(settings: Settings, unique: str, tmp_path: Path) -> AsyncIterator[EngineProcess]:
    """One engine worker process on topics of this test's own, stopped afterwards."""
    proc = EngineProcess(
        settings, prefix=f"it-{unique}", data_dir=tmp_path / "state", partitions=ENGINE_PARTITIONS
    )
    await proc.start()
    yield proc
    await proc.stop()


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def stack(settings: Settings) -> Iterator[None]:
    """Fail every integration test at once, with the fix, when a service is down."""
    kafka_host, _, kafka_port = settings.kafka_bootstrap.split(",")[0].rpartition(":")
    pg = urlparse(settings.pg_dsn)
    rd = urlparse(settings.redis_url)
    down = [
        name
        for name, host, port in (
            ("kafka", kafka_host, int(kafka_port)),
            ("postgresql", pg.hostname or "127.0.0.1", pg.port or 5432),
            ("redis", rd.hostname or "127.0.0.1", rd.port or 6379),
        )
        if not _reachable(host, port)
    ]
    if down:
        pytest.fail(f"services not reachable: {', '.join(down)} (start them: make services)")
    before = asyncio.run(_topics(settings.kafka_bootstrap))
    yield
    # Every test makes topics of its own; left behind, thousands of partitions pile up
    # in the dev broker and make each of its restarts take minutes. Two pytest runs
    # sharing one broker (several worktrees of one developer) set TALLY_TEST_KEEP_TOPICS=1,
    # or the first to end deletes the topics the other is still using.
    if os.environ.get("TALLY_TEST_KEEP_TOPICS") != "1":
        asyncio.run(_delete_new_topics(settings.kafka_bootstrap, before))


async def _topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def _delete_new_topics(bootstrap: str, before: set[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        new = sorted(
            t for t in await admin.list_topics() if t not in before and not t.startswith("_")
        )
        for start in range(0, len(new), 100):
            await admin.delete_topics(new[start : start + 100])
    finally:
        await admin.close()
