"""Tally on the three-broker cluster: its topics are made with the configured replication
(every partition on three brokers, min.insync.replicas 2 on the topic), an engine worker
applies commands on them, and a start-up says when replication does not fit the cluster.
Skipped when the cluster is not running (`make test-cluster` starts it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from core.settings import Settings
from harness.collector import Collector, all_answered, expected_counts
from harness.procs import EngineProcess, command, produce
from harness.scratch import scratch, unique_prefix
from tests.integration.cluster_support import on_cluster
from topics.admin import delete_topics, ensure_topics, topic_configs
from topics.ids import credit_id
from topics.names import changelog_name, engine_group, engine_topic_specs, replicas
from topics.replication import ReplicationError
from topics.schema import Deposit, Transfer
from topics.shard import shard_of
from topics.specs import Replicas, TopicSpec

pytestmark = pytest.mark.cluster

PARTITIONS = 4


async def _replication(bootstrap: str, names: list[str]) -> dict[str, Any]:
    """Per topic: the replica and ISR counts of its partitions, and its min ISR."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(names)
        configs = await topic_configs(admin, names)
    finally:
        await admin.close()
    return {
        d["topic"]: {
            "replicas": sorted({len(p["replicas"]) for p in d["partitions"]}),
            "isr": sorted({len(p["isr"]) for p in d["partitions"]}),
            "leaders": len({p["leader"] for p in d["partitions"]}),
            "min.insync.replicas": configs[d["topic"]].get("min.insync.replicas"),
        }
        for d in described
    }


async def test_a_scratch_deployments_topics_have_three_replicas_and_min_isr_two(
    settings: Settings,
) -> None:
    cluster = await on_cluster(settings)
    async with scratch(
        cluster, unique_prefix("cl"), partitions=PARTITIONS, topics="engine"
    ) as found:
        names = [spec.name for spec in engine_topic_specs(found.settings)]
        got = await _replication(cluster.kafka_bootstrap, names)
    assert set(got) == set(names)
    for name in names:
        # Every partition on all three brokers, all in sync, leaders spread over them.
        assert got[name] == {
            "replicas": [3],
            "isr": [3],
            "leaders": 3,
            "min.insync.replicas": "2",
        }, name


async def test_an_engine_worker_applies_commands_on_the_cluster(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    cluster = await on_cluster(settings)
    prefix = f"cl-{unique}"
    engine = EngineProcess(
        cluster, prefix=prefix, data_dir=tmp_path / "state", partitions=PARTITIONS
    )
    # The worker made its own topics, from the settings handed to it.
    local = msgspec.structs.replace(cluster, topic_prefix=prefix, partitions=PARTITIONS)
    names = [spec.name for spec in engine_topic_specs(local)]
    try:
        await engine.start()
        a = f"alice-{unique}"
        # On another shard than a: the transfer's credit crosses the internal topic.
        b = next(
            b
            for n in range(100)
            if shard_of(b := f"bob{n}-{unique}", PARTITIONS) != shard_of(a, PARTITIONS)
        )
        cmds = [
            Deposit(command_id="d1", account=a, asset="USD", amount=1000),
            Transfer(command_id="t1", account=a, to=b, asset="USD", amount=300),
            Deposit(command_id="d2", account=b, asset="USD", amount=5),
        ]
        collector = Collector(cluster.kafka_bootstrap, engine.topics)
        await collector.start(from_end=False)
        try:
            await produce(
                cluster.kafka_bootstrap, engine.topics.commands.name, [command(c) for c in cmds]
            )
            expected = expected_counts([*(c.command_id for c in cmds), credit_id(a, "t1")])
            assert await collector.wait_for(
                all_answered(expected), timeout_s=60, say=lambda _: None
            ), engine.tail()
            results = collector.results
        finally:
            await collector.stop()
        for cid in expected:
            assert [r.status.value for r in results.by_id[cid]] == ["applied"], cid
        balances = {x: await engine.balances(x) for x in (a, b)}
        assert balances[a]["USD"].available == 700
        assert balances[b]["USD"].available == 305
        got = await _replication(cluster.kafka_bootstrap, names)
    finally:
        await engine.stop()
        await delete_topics(cluster.kafka_bootstrap, names)
    assert changelog_name(engine_group(local)) in got
    assert {name: (g["replicas"], g["min.insync.replicas"]) for name, g in got.items()} == {
        name: ([3], "2") for name in names
    }


async def test_more_replicas_than_brokers_is_refused_in_words(settings: Settings) -> None:
    cluster = await on_cluster(settings, topic_replication=4)
    spec = _spec(f"{unique_prefix('cl')}.x", replicas(cluster))
    with pytest.raises(ReplicationError, match=r"TALLY_TOPIC_REPLICATION=4 .* 3 brokers up"):
        await ensure_topics(cluster.kafka_bootstrap, [spec])


async def test_replication_one_on_the_cluster_warns_and_an_older_topic_is_named(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await on_cluster(settings)
    name = f"{unique_prefix('cl')}.old"
    try:
        with caplog.at_level(logging.WARNING, logger="topics.admin"):
            # Made by a start-up with the defaults: one replica, and it says so.
            await ensure_topics(cluster.kafka_bootstrap, [_spec(name, Replicas())])
            single = [r.getMessage() for r in caplog.records]
            caplog.clear()
            # The next start-up asks for three: the topic is named, not reassigned.
            await ensure_topics(cluster.kafka_bootstrap, [_spec(name, replicas(cluster))])
            older = [r.getMessage() for r in caplog.records]
        got = await _replication(cluster.kafka_bootstrap, [name])
    finally:
        await delete_topics(cluster.kafka_bootstrap, [name])
    assert len(single) == 1, single
    assert "3 brokers but TALLY_TOPIC_REPLICATION is 1" in single[0]
    assert len(older) == 1, older
    assert older[0].startswith(f"topic {name} has 1 replica but TALLY_TOPIC_REPLICATION is 3")
    assert got[name]["replicas"] == [1]


def _spec(name: str, copies: Replicas) -> TopicSpec:
    return TopicSpec(
        name=name, partitions=2, cleanup_policy="delete", retention_ms=-1, replicas=copies
    )
