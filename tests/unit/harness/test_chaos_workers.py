"""The chaos harness picks a zombie among the workers that serve a shard: while the group
rebalances (a worker just restarted), every worker may serve nothing for a moment, and a
worker SIGSTOPped then would have nothing to be fenced from."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from core.settings import Settings
from harness.chaos.plan import Fault
from harness.chaos.record import Run, Timeline
from harness.chaos.workers import Workers


class _Worker:
    """A live worker whose /readyz reports no shard for its first `idle` answers."""

    def __init__(self, idle: int, shards: list[int]) -> None:
        self.proc = SimpleNamespace(returncode=None)
        self.idle = idle
        self.shards = shards

    async def readyz(self) -> dict[str, Any]:
        if self.idle > 0:
            self.idle -= 1
            return {"serving": []}
        return {"serving": self.shards}


def _workers(*found: _Worker) -> Workers:
    run = Run(seed=1, duration_s=10, rate=1, plan=[])
    workers = Workers(Settings(), "p", Path("/nonexistent"), Timeline(run, lambda _: None))
    workers.all = list(found)  # type: ignore[arg-type]
    return workers


FAULT = Fault(at_s=1.0, kind="sigstop", pick=0.0, pause_s=1.0)


async def test_a_zombie_is_picked_once_a_worker_serves_a_shard() -> None:
    idle, busy = _Worker(idle=10**6, shards=[]), _Worker(idle=3, shards=[0, 1])
    picked = await _workers(idle, busy).pick_serving(FAULT)
    assert picked is not None and picked[1] is busy


async def test_no_zombie_when_no_worker_serves_a_shard() -> None:
    workers = _workers(_Worker(idle=10**6, shards=[]), _Worker(idle=10**6, shards=[]))
    assert await workers.pick_serving(FAULT, wait_s=1.0) is None
