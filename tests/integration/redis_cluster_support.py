"""What the Redis Cluster tests share: the settings that point Tally at the cluster of
scripts/redis-cluster.sh (127.0.0.1:17001..17006), a skip with the reason when it is not up,
and a look at its nodes (roles, slots, pids) for the failover test."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from core.settings import Settings
from harness.procs import ROOT

FIRST_PORT = 17001
PORTS = range(FIRST_PORT, FIRST_PORT + 6)
CLUSTER_URL = f"redis://127.0.0.1:{FIRST_PORT}/0"
START = "scripts/redis-cluster.sh up (or make services REDIS_CLUSTER=1)"


def cluster_settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, redis_url=CLUSTER_URL, redis_cluster=True)


def _node(port: int) -> redis.Redis:
    # No retries: a node that is down says so at once (redis-py's default backs off ~4 s).
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )  # fmt: skip


def state(port: int = FIRST_PORT) -> str | None:
    """The node's cluster_state (ok / fail), None when it does not answer."""
    try:
        with _node(port) as node:
            return str(node.cluster("info")["cluster_state"])
    except (redis.RedisError, OSError):
        return None


def require_cluster() -> None:
    """Skip the test (saying why) unless the cluster answers ok on every node."""
    down = [port for port in PORTS if state(port) != "ok"]
    if down:
        pytest.skip(f"Redis Cluster not up (nodes {down} not cluster_state:ok); start it: {START}")


@dataclass(frozen=True)
class Node:
    port: int
    master: bool
    failing: bool
    slots: tuple[tuple[int, int], ...]

    def serves(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)


def nodes(port: int) -> list[Node]:
    """The cluster as node `port` sees it."""
    with _node(port) as node:
        found = node.cluster("nodes")
    out = []
    for address, n in found.items():
        slots = tuple((int(s[0]), int(s[-1])) for s in n["slots"])
        flags = n["flags"]
        out.append(Node(int(address.rsplit(":", 1)[1]), "master" in flags, "fail" in flags, slots))
    return out


def master_of(key: str, port: int = FIRST_PORT) -> int:
    """The port of the master serving `key`'s slot, as node `port` sees it."""
    slot = key_slot(key.encode())
    return next(n.port for n in nodes(port) if n.master and not n.failing and n.serves(slot))


def pid_of(port: int) -> int:
    cache = Path(os.environ.get("TALLY_CACHE_DIR", ROOT / ".cache"))
    return int((cache / "redis-cluster" / str(port) / "redis.pid").read_text().split()[0])


def wait_promoted(dead: int, key: str, *, timeout_s: float) -> float:
    """Wait until another master serves `key`'s slot and every live node says ok; the
    seconds it took. (Bounded: AssertionError after timeout_s.)"""
    started = time.monotonic()
    live = [p for p in PORTS if p != dead]
    while time.monotonic() - started < timeout_s:
        try:
            if all(state(p) == "ok" for p in live) and master_of(key, live[0]) != dead:
                return time.monotonic() - started
        except (StopIteration, redis.RedisError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"no replica took over from node {dead} within {timeout_s}s")
