"""Sinks under faults, with real processes and a real PostgreSQL: `kill -9` of a sink
mid-stream, and PostgreSQL stopped for a few seconds under load. Afterwards no row is
lost, none is doubled, and the stores agree with the engine's events."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
from pathlib import Path

import asyncpg
import msgspec
import pytest

from core.settings import Settings, child_env
from harness import faults
from harness.procs import ROOT
from sinks import verify
from tests.integration.sink_support import Deployment, deployment, running

pytestmark = pytest.mark.fault


async def _entries(d: Deployment) -> int:
    conn = await asyncpg.connect(d.settings.pg_dsn)
    try:
        n = await conn.fetchval(f'SELECT count(*) FROM "{d.schema}".ledger_entries')
        return int(n)
    finally:
        await conn.close()


async def _until(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.2)
    return False


def _sink_process_env(d: Deployment) -> dict[str, str]:
    # Small batches: many transactions, so the kill lands among them.
    return child_env(msgspec.structs.replace(d.settings, sink_batch_size=100, sink_linger_ms=20))


async def test_kill_9_of_the_postgres_sink_loses_and_doubles_nothing(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    async with deployment(settings, unique, tmp_path, count=3000) as d:
        log = (tmp_path / "sink.log").open("ab")
        start = [sys.executable, "-m", "tally.cli", "sink", "postgres"]
        env = _sink_process_env(d)
        sink = await asyncio.create_subprocess_exec(
            *start, cwd=ROOT, env=env, stdout=log, stderr=log
        )
        producing = asyncio.create_task(d.produce())
        try:
            assert await _until(lambda: _has_rows(d, 500), 90), (tmp_path / "sink.log").read_text()
            sink.send_signal(signal.SIGKILL)
            assert await sink.wait() == -signal.SIGKILL
            sink = await asyncio.create_subprocess_exec(
                *start, cwd=ROOT, env=env, stdout=log, stderr=log
            )
            await producing
            events = await d.drained()
            total = sum(len(r.entries) for g in d.collector.results.by_id.values() for r in g)

            async def caught_up() -> bool:
                return await _entries(d) == total and await d.pg() == events

            assert await _until(caught_up, 90), (
                f"{await _entries(d)} of {total} entries; {shlex.join(start)} log:\n"
                + (tmp_path / "sink.log").read_text()[-3000:]
            )
        finally:
            producing.cancel()
            if sink.returncode is None:
                sink.send_signal(signal.SIGTERM)
                await sink.wait()
            log.close()
        s = d.settings
        found = await verify.agreement(s.pg_dsn, d.schema, s.redis_url, "-unused-", events)
        pg_checks = [c for c in found if "Redis" not in c.name]
        assert all(c.ok for c in pg_checks), "\n".join(c.line() for c in pg_checks)


async def _has_rows(d: Deployment, n: int) -> bool:
    try:
        return await _entries(d) >= n
    except asyncpg.UndefinedTableError:
        return False


async def test_postgres_stopped_under_load_then_the_sink_catches_up(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    cluster = await faults.pg_cluster(settings.pg_dsn)
    async with deployment(settings, unique, tmp_path, count=3000) as d:
        pg, rd = d.runner("postgres"), d.runner("redis")
        pg.batch_size = 100
        stopped = restarted = False
        async with running(pg, rd):
            producing = asyncio.create_task(d.produce())
            try:
                assert await _until(lambda: _has_rows(d, 300), 90)
                await faults.stop_postgres(cluster)
                stopped = True
                await asyncio.sleep(3)
                await faults.start_postgres(cluster)
                restarted = True
                await producing
                events = await d.drained()
                assert await verify.wait_drained([pg, rd], timeout_s=120)
            finally:
                producing.cancel()
                if stopped and not restarted:
                    await faults.start_postgres(cluster)
        assert pg.outages >= 1, "the sink never saw PostgreSQL go away"
        assert pg.down_since is None
        s = d.settings
        found = await verify.agreement(s.pg_dsn, d.schema, s.redis_url, s.topic_prefix, events)
        assert all(c.ok for c in found), "\n".join(c.line() for c in found)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


def _share(pid: int) -> list[int]:
    """The partitions a sink child was started for: its `--partitions` argument."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert "--partitions" in argv, argv
    return [int(p) for p in argv[argv.index("--partitions") + 1].split(",")]


def _assert_split(shares: list[list[int]], partitions: int) -> None:
    """Each child has partitions of its own, none shared, and together all of them."""
    flat = [p for share in shares for p in share]
    assert all(shares), shares
    assert len(flat) == len(set(flat)), f"a partition in two processes: {shares}"
    assert sorted(flat) == list(range(partitions)), f"not every partition served: {shares}"


async def test_sink_processes_split_the_partitions_and_a_killed_one_is_restarted(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    async with deployment(settings, unique, tmp_path, count=3000) as d:
        log = (tmp_path / "sink.log").open("ab")
        env = _sink_process_env(d)
        start = [sys.executable, "-m", "tally.cli", "sink", "postgres", "--processes", "2"]
        parent = await asyncio.create_subprocess_exec(
            *start, cwd=ROOT, env=env, stdout=log, stderr=log
        )
        producing = asyncio.create_task(d.produce())
        try:
            assert await _until(lambda: _has_rows(d, 300), 90), (tmp_path / "sink.log").read_text()
            children = _children(parent.pid)
            assert len(children) == 2, children
            shares = {pid: _share(pid) for pid in children}
            _assert_split(list(shares.values()), d.settings.partitions)
            os.kill(children[0], signal.SIGKILL)
            await producing
            events = await d.drained()
            total = sum(len(r.entries) for g in d.collector.results.by_id.values() for r in g)

            async def caught_up() -> bool:
                return await _entries(d) == total and await d.pg() == events

            assert await _until(caught_up, 90), (tmp_path / "sink.log").read_text()[-3000:]
            restarted = _children(parent.pid)
            assert len(restarted) == 2 and children[0] not in restarted
            # The new process took the killed one's share: still split, still covering.
            again = {pid: _share(pid) for pid in restarted}
            _assert_split(list(again.values()), d.settings.partitions)
            assert sorted(again.values()) == sorted(shares.values()), (shares, again)
        finally:
            producing.cancel()
            if parent.returncode is None:
                parent.send_signal(signal.SIGTERM)
                assert await parent.wait() == 0
            log.close()
        assert "starting it again" in (tmp_path / "sink.log").read_text()
        s = d.settings
        found = await verify.agreement(s.pg_dsn, d.schema, s.redis_url, "-unused-", events)
        pg_checks = [c for c in found if "Redis" not in c.name]
        assert all(c.ok for c in pg_checks), "\n".join(c.line() for c in pg_checks)
