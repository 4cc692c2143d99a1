"""The cluster-only chaos faults: offered only when the run is on the local three-broker
Kafka cluster or the Redis Cluster, the broker or master they strike picked from the
plan's fraction, the masters read from CLUSTER NODES, and each kind sent to its
injector. Nothing here starts or breaks a server."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from core.settings import Settings
from harness import cluster
from harness.chaos import chaos_settings, job
from harness.chaos.inject import Injector
from harness.chaos.plan import CLUSTER_KINDS, KINDS, Fault, plan
from harness.chaos.record import Run, Timeline
from harness.chaos.workers import Workers
from harness.faults import FaultUnavailable

CLUSTER = "127.0.0.1:29092,127.0.0.1:29093,127.0.0.1:29094"


def _on(bootstrap: str = "127.0.0.1:9092", *, redis: bool = False) -> Settings:
    return msgspec.structs.replace(Settings(), kafka_bootstrap=bootstrap, redis_cluster=redis)


def test_the_kafka_cluster_is_in_use_when_the_bootstrap_names_one_of_its_brokers() -> None:
    assert cluster.kafka_cluster_in_use(_on(CLUSTER))
    assert cluster.kafka_cluster_in_use(_on("localhost:29093"))
    assert not cluster.kafka_cluster_in_use(_on("127.0.0.1:9092"))
    assert not cluster.kafka_cluster_in_use(_on("10.0.0.5:29092"))  # not the local one


def test_cluster_kinds_are_offered_only_with_their_cluster() -> None:
    assert cluster.usable_kinds(_on()) == []
    assert cluster.usable_kinds(_on(CLUSTER)) == ["broker_kill9", "broker_sigstop"]
    assert cluster.usable_kinds(_on(redis=True)) == ["redis_master_kill9"]
    assert cluster.usable_kinds(_on(CLUSTER, redis=True)) == list(CLUSTER_KINDS)


def test_the_default_kinds_add_the_cluster_kinds_there_are() -> None:
    assert job.kinds_of(None, _on()) == list(KINDS)
    assert job.kinds_of(None, _on(CLUSTER)) == [*KINDS, "broker_kill9", "broker_sigstop"]
    assert job.kinds_of("kill9, broker_kill9", _on(CLUSTER)) == ["kill9", "broker_kill9"]


def test_a_cluster_kind_without_its_cluster_is_refused_and_unknown_kinds_too() -> None:
    with pytest.raises(ValueError, match="redis_master_kill9 need the local cluster"):
        job.kinds_of("kill9,redis_master_kill9", _on(CLUSTER))
    with pytest.raises(ValueError, match="unknown"):
        job.kinds_of("kill9,meteor", _on())


def test_a_plan_of_cluster_kinds_has_each_once_and_says_what_it_does() -> None:
    faults = plan(5, 120, 3, CLUSTER_KINDS)
    assert sorted(f.kind for f in faults) == sorted(CLUSTER_KINDS)
    lines = {f.kind: f.line() for f in faults}
    assert "one cluster broker, restarted after" in lines["broker_kill9"]
    assert "one cluster broker, SIGCONT after" in lines["broker_sigstop"]
    assert "one Redis master, restarted after" in lines["redis_master_kill9"]


def test_pick_spreads_the_fraction_over_what_there_is() -> None:
    assert [cluster.pick([1, 2, 3], f) for f in (0.0, 0.34, 0.67, 0.999)] == [1, 2, 3, 3]
    with pytest.raises(FaultUnavailable):
        cluster.pick([], 0.5)


NODES = """\
a1 127.0.0.1:17004@27004 slave c3 0 1796185578136 1 connected
a2 127.0.0.1:17002@27002 master - 0 1796185577523 2 connected 5461-10922
a3 127.0.0.1:17003@27003 myself,master - 0 1796185577000 3 connected 10923-16383
a4 127.0.0.1:17001@27001 master,fail - 0 1796185577000 1 disconnected 0-5460
a5 127.0.0.1:17005@27005 master - 0 1796185577000 4 connected
a6 127.0.0.1:17006@27006 slave a2 0 1796185577000 2 connected
"""


def test_the_masters_are_those_with_slots_that_are_up() -> None:
    # 17001 failed, 17005 is a master with no slots (a failed-over one rejoining).
    assert cluster.masters_in(NODES) == [17002, 17003]


def test_a_pidfile_must_name_the_server_it_is_for(tmp_path: Path) -> None:
    pidfile = tmp_path / "kafka.pid"
    pidfile.write_text("1\n")  # init: alive, but not a broker
    with pytest.raises(FaultUnavailable, match=r"is not 'kafka\.Kafka'"):
        cluster._pid(pidfile, "kafka.Kafka")
    with pytest.raises(FaultUnavailable, match="no live process"):
        cluster._pid(tmp_path / "missing.pid", "kafka.Kafka")


def _injector(settings: Settings) -> Injector:
    run = Run(seed=1, duration_s=10, rate=1, plan=[])
    timeline = Timeline(run, lambda _: None)
    return Injector(settings, run, Workers(settings, "p", Path("/nonexistent"), timeline), timeline)


async def test_each_cluster_kind_goes_to_its_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    done: list[tuple[Any, ...]] = []

    async def kill_broker(n: int, *, down_s: float, sig: int) -> float:
        done.append(("kill", n, down_s, sig))
        return 1.0

    async def pause_broker(n: int, *, stopped_s: float) -> None:
        done.append(("pause", n, stopped_s))

    async def redis_masters() -> list[int]:
        return [17001, 17002, 17003]

    async def kill_redis_master(port: int, *, down_s: float) -> float:
        done.append(("master", port, down_s))
        return 1.0

    monkeypatch.setattr(cluster, "kill_broker", kill_broker)
    monkeypatch.setattr(cluster, "pause_broker", pause_broker)
    monkeypatch.setattr(cluster, "redis_masters", redis_masters)
    monkeypatch.setattr(cluster, "kill_redis_master", kill_redis_master)
    injector = _injector(_on(CLUSTER, redis=True))
    for kind, pick in (("broker_kill9", 0.0), ("broker_sigstop", 0.5), ("broker_restart", 0.9),
                       ("redis_master_kill9", 0.4)):  # fmt: skip
        await injector.inject(Fault(at_s=1.0, kind=kind, pick=pick, pause_s=2.0))
    assert done == [
        ("kill", 1, 2.0, signal.SIGKILL),
        ("pause", 2, 2.0),
        ("kill", 3, 2.0, signal.SIGTERM),  # on the cluster, a restart is of one broker
        ("master", 17002, 2.0),
    ]
    assert injector.run.carried_out == [
        "broker_kill9", "broker_sigstop", "broker_restart", "redis_master_kill9",
    ]  # fmt: skip


def test_on_the_redis_cluster_the_run_uses_database_0_the_only_one_there_is() -> None:
    assert chaos_settings(_on(), "c", 9).redis_url == "redis://127.0.0.1:6379/9"
    clustered = msgspec.structs.replace(_on(redis=True), redis_url="redis://127.0.0.1:17001/0")
    assert chaos_settings(clustered, "c", 9).redis_url == "redis://127.0.0.1:17001/0"
