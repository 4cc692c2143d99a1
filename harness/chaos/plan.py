"""The chaos run's plan: which faults, when, against which worker, drawn from the seed
(the same seed and duration give the same plan, whatever the machine's timings)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from streams.engine import session_timeout_ms

KINDS = ("kill9", "sigstop", "add_worker", "broker_restart", "pg_restart", "redis_flush")
# Faults only a cluster has (harness.cluster), offered when the run uses the three-broker
# Kafka cluster (the broker kinds) or the Redis Cluster (the master kill).
CLUSTER_KINDS = ("broker_kill9", "broker_sigstop", "redis_master_kill9")
# The short form run by `make test`: the faults that move shards between workers
# (a crash, a zombie) and the one that takes everything away at once (the broker).
SHORT_KINDS = ("kill9", "sigstop", "broker_restart")
PARTITIONS = 4
MAX_WORKERS = 3
# How long a SIGSTOPped worker stays stopped: past its session timeout, so that the
# group gives its shards to another worker before it wakes up.
STOP_S = session_timeout_ms / 1000 + 6
# ...and at most this much longer while its shards are still being taken over elsewhere.
STOP_MORE_S = 30.0
DRAIN_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Fault:
    at_s: float  # seconds after the load starts
    kind: str
    # Which worker (or cluster broker, or Redis master), as a fraction of those there are
    # when it strikes (the plan cannot know them).
    pick: float
    pause_s: float  # how long the thing stays down (kill9, broker, postgres, a cluster node)
    lose_disk: bool = False  # kill9: restart without the worker's state directory

    def line(self) -> str:
        extra = {
            "kill9": f"restart after {self.pause_s:.1f}s"
            + (", state directory deleted" if self.lose_disk else ""),
            "sigstop": f"SIGCONT after {STOP_S:.0f}s",
            "broker_restart": f"down {self.pause_s:.1f}s",
            "pg_restart": f"down {self.pause_s:.1f}s",
            "broker_kill9": f"one cluster broker, restarted after {self.pause_s:.1f}s",
            "broker_sigstop": f"one cluster broker, SIGCONT after {self.pause_s:.1f}s",
            "redis_master_kill9": f"one Redis master, restarted after {self.pause_s:.1f}s",
        }.get(self.kind, "")
        return f"t+{self.at_s:5.1f}s  {self.kind:<15} {extra}"


def plan(seed: int, duration_s: float, count: int, kinds: Iterable[str] = KINDS) -> list[Fault]:
    """`count` faults between 10% and 80% of the load: every kind once (in a seeded order)
    before any repeats, at seeded times at least a few seconds apart."""
    rng = random.Random(f"chaos-{seed}")
    kinds = list(kinds)
    order = rng.sample(kinds, len(kinds))
    chosen = [order[i] if i < len(order) else rng.choice(kinds) for i in range(count)]
    start, end = 0.1 * duration_s, 0.8 * duration_s
    slot = (end - start) / max(count, 1)
    faults_ = []
    for i, kind in enumerate(chosen):
        at = start + i * slot + rng.uniform(0, slot * 0.3)
        faults_.append(
            Fault(
                at_s=round(at, 1),
                kind=kind,
                pick=rng.random(),
                pause_s=round(rng.uniform(1.0, 4.0), 1),
                lose_disk=kind == "kill9" and rng.random() < 0.35,
            )
        )
    return faults_
