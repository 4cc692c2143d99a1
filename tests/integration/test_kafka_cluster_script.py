"""`scripts/kafka-cluster.sh`: a second `up` reuses the three brokers, never spawns more;
`status` says each is up and all three are registered; the make targets refuse a
BROKERS they do not know. Skipped when the cluster is not running (make test-cluster)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.cluster_support import CLUSTER_BOOTSTRAP, CLUSTER_PORTS, NOT_RUNNING

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kafka-cluster.sh"

pytestmark = pytest.mark.cluster


def _count(pattern: str) -> int:
    found = subprocess.run(["pgrep", "-fc", pattern], capture_output=True, text=True)
    return int(found.stdout.strip() or 0)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=180)


@pytest.fixture
def cluster_up() -> None:
    if _run("status").returncode != 0:
        pytest.skip(NOT_RUNNING)


@pytest.mark.usefixtures("cluster_up")
def test_second_up_reuses_all_three_brokers() -> None:
    done = _run("up")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for n in (1, 2, 3):
        assert any(line.startswith(f"kafka-{n}: already running") for line in lines), done.stdout
    assert lines[-1].startswith("kafka-cluster: 3 brokers registered"), done.stdout
    assert CLUSTER_BOOTSTRAP in lines[-1]
    # Three cluster JVMs, whichever checkout started them, and the single broker apart.
    assert _count(r"java .*kafka\.Kafka \S*/kafka-cluster/broker-[123]/server\.properties") == 3
    assert _count(r"java .*kafka\.Kafka \S*/kafka/server\.properties") <= 1


@pytest.mark.usefixtures("cluster_up")
def test_status_names_each_broker_and_the_registered_count() -> None:
    done = _run("status")
    assert done.returncode == 0, done.stdout + done.stderr
    said = {line.split(":", 1)[0]: line for line in done.stdout.splitlines()}
    for n, port in zip((1, 2, 3), CLUSTER_PORTS, strict=True):
        assert said[f"kafka-{n}"].startswith(f"kafka-{n}: up ("), done.stdout
        assert f"127.0.0.1:{port}" in said[f"kafka-{n}"]
    assert said["kafka-cluster"].startswith("kafka-cluster: up (3 brokers registered"), done.stdout


def test_make_refuses_a_broker_count_it_has_no_cluster_for() -> None:
    done = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "services-status", "BROKERS=2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "BROKERS must be 1 or 3 (got '2')" in done.stderr
