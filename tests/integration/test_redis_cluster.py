"""Tally on a real Redis Cluster (scripts/redis-cluster.sh: 3 masters + 3 replicas on
127.0.0.1:17001..17006; skipped, with the reason, when it is not up): the Redis sink writes a
scratch deployment's events into it, spread over every master by the `{shard}` hash tags;
what the ingress serves from it, the audit and the checks read back agree with the engine;
a replay over the full cluster changes nothing; the replay check claims a signature once.
(The last two tests need no cluster: a URL where none answers, or a single Redis.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from redis.exceptions import RedisClusterException

from audit.run import Audit, render
from core.settings import Settings
from harness.procs import free_port
from ingress.read_routes import Reads
from ingress.replay import SeenSignatures
from sinks import redis_client, verify
from sinks.redis_store import RedisStore, offset_key
from tests.integration import redis_cluster_support as cluster
from tests.integration.sink_support import PARTITIONS, deployment, running
from topics.shard import shard_of


@pytest.fixture
def on_cluster(settings: Settings) -> Settings:
    cluster.require_cluster()
    return cluster.cluster_settings(settings)


async def test_the_sink_and_every_reader_agree_on_a_cluster(
    on_cluster: Settings, unique: str, tmp_path: Path
) -> None:
    async with deployment(on_cluster, unique, tmp_path) as d:
        s = d.settings
        assert s.redis_cluster and s.redis_url == cluster.CLUSTER_URL
        _, rd = await d.project()
        events = verify.event_balances(d.collector.results)
        assert rd.written_events > 0 and rd.dead_lettered == 0

        # The stores (Redis read by a SCAN over every master) agree with the engine.
        found = await verify.agreement(
            s.pg_dsn, d.schema, s.redis_url, s.topic_prefix, events, cluster=True
        )
        assert all(c.ok for c in found), "\n".join(c.line() for c in found)

        # The shards really are spread: every master holds some of them.
        masters = {cluster.master_of(offset_key(s.topic_prefix, p)) for p in range(PARTITIONS)}
        assert len(masters) >= 2, masters

        # The ingress's cached read (one shard's keys a request) serves the same balances.
        client = redis_client.connect_to(s)
        try:
            reads = Reads(s, SimpleNamespace(redis=client), None, None)  # type: ignore[arg-type]
            served: dict[tuple[str, str], tuple[int, int, int]] = {}
            for account in sorted({a for a, _ in events}):
                cached = await reads._cached(account, shard_of(account, PARTITIONS))
                for asset, b in cached.items():
                    served[(account, asset)] = (b["available"], b["held"], b["seq"])
            assert served == events

            # The replay check: a signature is claimed once, across the cluster's masters.
            seen = SeenSignatures(client, s.topic_prefix)
            firsts = [await seen.claim("k", f"{i:032x}{0:032x}", 60) for i in range(20)]
            again = [await seen.claim("k", f"{i:032x}{0:032x}", 60) for i in range(20)]
            assert all(firsts) and not any(again)
        finally:
            await client.aclose()

        # The audit: ledger, PostgreSQL, Redis (scanned on every master) and the engine.
        report = await Audit(
            s, engine_url=f"http://127.0.0.1:{d.engine.port}", say=lambda _: None
        ).run()
        assert report.ok, render(report)
        assert report.compared["redis"] == report.balances == len(events)

        # A replay of the whole topic over the full cluster changes no byte.
        dump = await verify.redis_dump(s.redis_url, s.topic_prefix, cluster=True)
        client = redis_client.connect_to(s)
        try:
            await client.delete(*(offset_key(s.topic_prefix, p) for p in range(PARTITIONS)))
        finally:
            await client.aclose()
        rd2 = d.runner("redis", group=f"replay-rd-{unique}")
        async with running(rd2):
            assert await verify.wait_drained([rd2], timeout_s=120)
        assert rd2.written_events == rd.written_events
        assert await verify.redis_dump(s.redis_url, s.topic_prefix, cluster=True) == dump


async def test_a_cluster_that_does_not_answer_is_an_outage_to_the_sink() -> None:
    """No node answers at the URL: the sink's store raises what it waits out (a connection
    error), not the cluster client's own exception, which would stop the sink."""
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", "x", 4, cluster=True)
    with pytest.raises(store.unavailable):
        await store.open()
    with pytest.raises(store.unavailable):
        await store.ping(1.0)
    await store.close()


async def test_the_cluster_setting_against_a_single_redis_is_refused_not_waited_out(
    settings: Settings,
) -> None:
    """TALLY_REDIS_CLUSTER=true with TALLY_REDIS_URL at a single Redis: a settings mistake,
    raised at once (the sink would otherwise wait for a cluster that never comes)."""
    store = RedisStore(settings.redis_url, "x", 4, cluster=True)
    with pytest.raises(RedisClusterException, match="Cluster mode is not enabled"):
        await store.open()
    await store.close()
