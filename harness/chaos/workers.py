"""The chaos run's engine workers: one consumer group of `tally engine` processes, each
with its own state directory and web port, which the run starts, restarts when one
exits on its own (as a supervisor would, noting it as a finding), picks from for a
fault, and heals at the end."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

from core.settings import Settings
from harness import waits
from harness.chaos.plan import PARTITIONS, Fault
from harness.chaos.record import ChaosError, Timeline
from harness.procs import EngineProcess

# How long a sigstop waits for a worker that serves a shard (the group may be
# rebalancing after an earlier fault) before it is skipped.
SERVING_WAIT_S = 30.0


class Workers:
    def __init__(self, base: Settings, prefix: str, work_dir: Path, timeline: Timeline) -> None:
        self.base = base
        self.prefix = prefix
        self.work_dir = work_dir
        self.timeline = timeline
        self.all: list[EngineProcess] = []
        self.killed: set[int] = set()  # workers the harness killed and not restarted yet
        self.retired: set[int] = set()  # workers stopped for good (a scale-down)
        self.deaths: list[str] = []  # workers that exited on their own

    async def add(self) -> EngineProcess:
        n = len(self.all)
        worker = EngineProcess(
            self.base,
            prefix=self.prefix,
            data_dir=self.work_dir / f"worker-{n}",
            partitions=PARTITIONS,
        )
        self.all.append(worker)
        await worker.start(wait=False)
        return worker

    async def supervise(self) -> None:
        """What a process supervisor does in production: a worker that exited without
        being killed by the harness is noted (a finding) and started again."""
        while True:
            await asyncio.sleep(0.5)
            for n, worker in enumerate(self.all):
                proc = worker.proc
                if proc is None or proc.returncode is None or n in self.killed | self.retired:
                    continue
                self.deaths.append(
                    f"worker-{n} exited {proc.returncode} at t+{self.timeline.elapsed():.1f}s"
                )
                self.timeline.note(
                    f"worker-{n} EXITED on its own ({proc.returncode}); restarting it"
                )
                await worker.start(wait=False)

    def live(self) -> list[EngineProcess]:
        return [w for w in self.all if w.proc is not None and w.proc.returncode is None]

    def pick(self, fault: Fault) -> tuple[int, EngineProcess] | None:
        live = self.live()
        if not live:
            return None
        worker = live[min(len(live) - 1, int(fault.pick * len(live)))]
        return self.all.index(worker), worker

    async def serving(self, worker: EngineProcess) -> list[int]:
        """The shards a live worker serves, by its /readyz; none if it does not answer."""
        return await waits.serving(worker)

    async def pick_serving(
        self, fault: Fault, *, wait_s: float = SERVING_WAIT_S
    ) -> tuple[int, EngineProcess] | None:
        """Like `pick`, among the live workers that serve a shard (a zombie that served
        nothing would have nothing to be fenced from). During a rebalance every worker
        may serve nothing for a while: wait for one that does, at most `wait_s`; None
        if none did (the fault is then skipped, which fails the run)."""
        deadline = time.monotonic() + wait_s
        while True:
            serving = [w for w in self.live() if await self.serving(w)]
            if serving or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
        if not serving:
            return None
        worker = serving[min(len(serving) - 1, int(fault.pick * len(serving)))]
        return self.all.index(worker), worker

    async def heal(self) -> None:
        """Every worker running again (a stopped one continued, a dead one restarted)."""
        for n, worker in enumerate(self.all):
            if worker.proc is None or n in self.retired:
                continue
            if worker.proc.returncode is None:
                worker.proc.send_signal(signal.SIGCONT)
            else:
                if n not in self.killed:
                    self.deaths.append(f"worker-{n} exited {worker.proc.returncode}")
                self.timeline.note(
                    f"heal: worker-{n} had exited ({worker.proc.returncode}); restarted"
                )
                await worker.start(wait=False)
        serving = [w for n, w in enumerate(self.all) if n not in self.retired]
        try:
            await asyncio.gather(*(w.wait_ready() for w in serving))
        except Exception as exc:
            raise ChaosError(f"a worker did not come back: {exc}") from exc

    async def summary(self, w: EngineProcess) -> dict[str, Any]:
        summary: dict[str, Any] = {"log": str(w.log_path)}
        with contextlib.suppress(Exception):
            summary.update(await asyncio.wait_for(w.readyz(), 5))
        return summary

    async def stop(self) -> None:
        """Stop every worker (a stopped one is continued first, so that it can exit)."""
        for w in self.all:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(signal.SIGCONT)
            await w.stop()
