"""A Redis Cluster master killed (-9) while the Redis sink writes: its replica takes over,
the sink waits the failover out and goes on, and nothing is lost (the store agrees with
the engine's events at the end; a write the dead master acknowledged but never passed on
is progress gone, which the sink notices and writes again). Then the killed node is
started again and rejoins as a replica, so the cluster is whole for the next test.

While the dead master's slots have no master yet, the ingress's cached read answers 503 for
an account of those shards and goes on answering for the others (the other masters serve).

Needs the cluster of scripts/redis-cluster.sh (skipped, with the reason, without it). The
test prints what it measured: how long the replica took to be promoted, and how long the
sink wrote nothing (from the kill to its first batch after it)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from core.settings import Settings
from harness.procs import ROOT, trickle
from ingress.problems import Problem
from ingress.read_routes import Reads
from sinks import redis_client, verify
from sinks.redis_store import offset_key
from tests.integration import redis_cluster_support as cluster
from tests.integration.sink_support import PARTITIONS, deployment, running
from tests.waiting import until
from topics.shard import shard_of

PROMOTION_TIMEOUT_S = 30.0


def _restart_cluster() -> str:
    """scripts/redis-cluster.sh up: starts the killed node, waits until the cluster is whole."""
    done = subprocess.run(
        ["scripts/redis-cluster.sh", "up"], cwd=ROOT, capture_output=True, text=True,
        timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def _on_and_off(accounts: list[str], victim: int, prefix: str) -> tuple[str, str]:
    """An account whose shard the victim serves, and one a live master serves."""
    master = {p: cluster.master_of(offset_key(prefix, p)) for p in range(PARTITIONS)}
    on = next(a for a in accounts if master[shard_of(a, PARTITIONS)] == victim)
    off = next(a for a in accounts if master[shard_of(a, PARTITIONS)] != victim)
    return on, off


async def _reads_while_failing_over(reads: Reads, on: str, off: str) -> None:
    """The account on the dead master: 503; the one on a live master: served."""
    with pytest.raises(Problem) as refused:
        await reads._cached(on, shard_of(on, PARTITIONS))
    assert refused.value.status == 503
    assert isinstance(await reads._cached(off, shard_of(off, PARTITIONS)), dict)


async def test_a_master_killed_while_the_sink_writes_fails_over_and_nothing_is_lost(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    cluster.require_cluster()
    async with deployment(
        cluster.cluster_settings(settings), unique, tmp_path, count=6000, accounts=300
    ) as d:
        s = d.settings
        rd = d.runner("redis")
        batches_at: list[float] = []
        rd.on_batch = lambda _: batches_at.append(time.monotonic())
        key = offset_key(s.topic_prefix, 0)
        victim = cluster.master_of(key)
        pid = cluster.pid_of(victim)
        records = [(r.key, r.value, None) for r in d.workload.records]
        accounts = sorted({str(r.key) for r in d.workload.records})
        topic = d.engine.topics.commands.name
        reader: Any = redis_client.connect_to(s, socket_timeout=2, socket_connect_timeout=1)
        reads = Reads(s, SimpleNamespace(redis=reader), None, None)  # type: ignore[arg-type]
        try:
            async with running(rd):
                # About 15 s of load: the kill lands in the middle of it.
                load = asyncio.create_task(
                    trickle(s.kafka_bootstrap, topic, records, chunks=80, pause_s=0.15)
                )
                try:
                    await until(
                        lambda: rd.written_events > 0, timeout_s=60, what="the sink wrote nothing"
                    )
                    await asyncio.sleep(1.0)
                    on, off = _on_and_off(accounts, victim, s.topic_prefix)
                    killed_at = time.monotonic()
                    os.kill(pid, signal.SIGKILL)
                    await _reads_while_failing_over(reads, on, off)
                    await asyncio.to_thread(
                        cluster.wait_promoted, victim, key, timeout_s=PROMOTION_TIMEOUT_S
                    )
                    promoted_s = time.monotonic() - killed_at
                    await load
                finally:
                    load.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await load
                events = await d.drained()
                assert await verify.wait_drained([rd], timeout_s=120)
            found = verify.compare(
                "Redis = engine events",
                events,
                await verify.redis_balances(s.redis_url, s.topic_prefix, cluster=True),
            )
            assert found.ok, found.line()
            assert any(t > killed_at for t in batches_at), "the sink wrote nothing after the kill"
            # The sink's longest pause: the widest gap between two batches written (or
            # from the kill to the first batch after it). A batch that touches only live
            # masters' shards may still get through just after the kill.
            marks = sorted([*batches_at, killed_at])
            stalled_s = max(b - a for a, b in itertools.pairwise(marks))
            print(
                f"\nredis failover: node {victim} killed; replica promoted after "
                f"{promoted_s:.1f}s; the sink's longest pause {stalled_s:.1f}s; "
                f"{rd._outages.count} outage(s), {rd.rebuilds} rebuild(s), "
                f"{rd.written_events} events written, {found.compared} balances agree"
            )
            assert rd._outages.count >= 1  # it did see the master go
            assert stalled_s < PROMOTION_TIMEOUT_S
        finally:
            await reader.aclose()
            said = await asyncio.to_thread(_restart_cluster)
            print(f"redis failover: {said}")
    rejoined = {n.port: n for n in cluster.nodes(cluster.FIRST_PORT)}[victim]
    assert not rejoined.master and not rejoined.failing, rejoined
    assert all(cluster.state(p) == "ok" for p in cluster.PORTS)
