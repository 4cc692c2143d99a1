"""Faults only a cluster has, for the chaos run: one broker of the three-broker Kafka
cluster killed (SIGKILL) or paused (SIGSTOP), and a master of the Redis Cluster killed.

The clusters are the local ones of `scripts/kafka-cluster.sh` (brokers on
127.0.0.1:29092-29094, state in $TALLY_CACHE_DIR/kafka-cluster/broker-<n>/ with kafka.pid)
and `scripts/redis-cluster.sh` (nodes on 127.0.0.1:17001-17006, state in
$TALLY_CACHE_DIR/redis-cluster/<port>/ with redis.pid). A run uses the Kafka cluster when
its bootstrap list names one of those brokers, and the Redis Cluster when
TALLY_REDIS_CLUSTER is on; the cluster kinds are offered only then (`usable_kinds`). A
killed server is brought back by its script's `up`, which starts what is down and waits
until the cluster is whole again. Nothing here is used by a deployment.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.settings import Settings
from harness import faults
from harness.faults import FaultUnavailable
from harness.procs import ROOT
from sinks import redis_client

# The cluster's broker client ports and their node numbers (kafka-cluster.sh).
KAFKA_BROKERS = {29092: 1, 29093: 2, 29094: 3}
REDIS_PORTS = tuple(range(17001, 17007))
LOOPBACK = ("127.0.0.1", "localhost")
# Which cluster each cluster-only fault kind needs.
NEEDS = {"broker_kill9": "kafka", "broker_sigstop": "kafka", "redis_master_kill9": "redis"}
# A script's `up` waits for the whole cluster (three JVMs may boot on two cores).
script_timeout_s = 240.0
exit_timeout_s = 30.0


def cache_dir() -> Path:
    """The services' state directory: TALLY_CACHE_DIR, else the checkout's .cache."""
    return Path(os.environ.get("TALLY_CACHE_DIR") or ROOT / ".cache").resolve()


def kafka_cluster_in_use(settings: Settings) -> bool:
    """Whether the bootstrap list names a broker of the local three-broker cluster."""
    for address in settings.kafka_bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        if host in LOOPBACK and port.isdigit() and int(port) in KAFKA_BROKERS:
            return True
    return False


def redis_cluster_in_use(settings: Settings) -> bool:
    """TALLY_REDIS_CLUSTER: every Redis user talks to a Redis Cluster."""
    return settings.redis_cluster


def usable_kinds(settings: Settings) -> list[str]:
    """The cluster-only fault kinds these settings' services can take."""
    using = {"kafka": kafka_cluster_in_use(settings), "redis": redis_cluster_in_use(settings)}
    return [kind for kind, needs in NEEDS.items() if using[needs]]


def pick(items: Sequence[Any], fraction: float) -> Any:
    """The item at `fraction` (0 <= fraction < 1) of the way along (a plan's `pick`)."""
    if not items:
        raise FaultUnavailable("nothing to pick from")
    return items[min(len(items) - 1, int(fraction * len(items)))]


def _pid(pidfile: Path, marker: str) -> int:
    """The live process of a pidfile whose command line contains `marker`."""
    try:
        pid = int(pidfile.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError, IndexError) as exc:
        raise FaultUnavailable(f"no live process in {pidfile}: {exc}") from exc
    if marker not in cmdline:
        raise FaultUnavailable(f"pid {pid} of {pidfile} is not {marker!r}: {cmdline[:120]}")
    return pid


def local_broker_pid() -> int:
    """The JVM of the single broker `make services` runs (scripts/services.sh)."""
    return _pid(cache_dir() / "kafka" / "kafka.pid", "kafka.Kafka")


def broker_pid(n: int) -> int:
    """The JVM of cluster broker `n` (1..3)."""
    return _pid(cache_dir() / "kafka-cluster" / f"broker-{n}" / "kafka.pid", "kafka.Kafka")


def redis_pid(port: int) -> int:
    """The redis-server of Redis Cluster node `port`."""
    return _pid(cache_dir() / "redis-cluster" / str(port) / "redis.pid", "redis-server")


async def _gone(pid: int) -> None:
    deadline = time.monotonic() + exit_timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"pid {pid} did not exit in {exit_timeout_s:.0f}s")


async def script_up(script: str) -> None:
    """`scripts/<script> up` on the services' state directory: starts what is down and
    waits until the cluster is whole."""
    await faults.script_up(script, cache_dir(), timeout_s=script_timeout_s)


async def kill_broker(n: int, *, down_s: float, sig: int = signal.SIGKILL) -> float:
    """Broker `n` killed with `sig` (SIGTERM: a clean stop), left down `down_s`, brought
    back by kafka-cluster.sh; the seconds from the kill to the cluster being whole."""
    pid = broker_pid(n)
    started = time.monotonic()
    os.kill(pid, sig)
    await _gone(pid)
    await asyncio.sleep(down_s)
    await script_up("kafka-cluster.sh")
    return time.monotonic() - started


async def pause_broker(n: int, *, stopped_s: float) -> None:
    """Broker `n` SIGSTOPped for `stopped_s`, then continued (whatever happened meanwhile):
    a broker that hangs without closing its connections."""
    pid = broker_pid(n)
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(stopped_s)
    finally:
        os.kill(pid, signal.SIGCONT)


def masters_in(nodes: str) -> list[int]:
    """The ports of the masters that hold slots and are not failed, from the text of
    CLUSTER NODES (`<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link>
    <slot ranges...>`)."""
    ports = []
    for line in nodes.splitlines():
        fields = line.split()
        if len(fields) < 9:
            continue  # no slots
        flags = fields[2].split(",")
        if "master" not in flags or "fail" in flags or "fail?" in flags:
            continue
        if fields[7] != "connected":
            continue
        ports.append(int(fields[1].split("@")[0].rpartition(":")[2]))
    return sorted(ports)


async def redis_masters(ports: Sequence[int] = REDIS_PORTS) -> list[int]:
    """The Redis Cluster's masters, by CLUSTER NODES from the first node that answers."""
    for port in ports:
        # One node as it is (not the cluster client): its own view of the cluster.
        client = redis_client.connect(
            f"redis://127.0.0.1:{port}/0", cluster=False, socket_timeout=3
        )
        try:
            text = await client.execute_command("CLUSTER", "NODES")
        except redis_client.ERRORS:
            continue
        finally:
            await client.aclose()
        return masters_in(text.decode() if isinstance(text, bytes) else str(text))
    raise FaultUnavailable(f"no Redis Cluster node answered on {ports[0]}-{ports[-1]}")


async def kill_redis_master(port: int, *, down_s: float) -> float:
    """The master on `port` killed (SIGKILL), left down `down_s` (its replica takes
    over after the cluster's node timeout), brought back by redis-cluster.sh (it
    rejoins as a replica); the seconds from the kill to the cluster being whole."""
    pid = redis_pid(port)
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    await _gone(pid)
    await asyncio.sleep(down_s)
    await script_up("redis-cluster.sh")
    return time.monotonic() - started
