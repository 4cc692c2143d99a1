"""The chaos run's faults, injected on the plan's schedule while the load runs: a worker
killed with SIGKILL (and restarted, sometimes without its state directory), a worker
SIGSTOPped past its session timeout until its shards have moved on (a zombie, which
must have been fenced), a worker added (or, at the most workers, one leaving), the
broker or PostgreSQL restarted, Redis flushed. Each is recorded as carried out, or as
skipped with the reason."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time

from core.settings import Settings
from harness import cluster, faults
from harness.chaos.plan import CLUSTER_KINDS, MAX_WORKERS, STOP_MORE_S, STOP_S, Fault
from harness.chaos.record import Run, Timeline, Zombie
from harness.chaos.waits import Mark
from harness.chaos.workers import Workers
from harness.procs import EngineProcess
from harness.waits import owners


class Injector:
    def __init__(self, settings: Settings, run: Run, workers: Workers, timeline: Timeline) -> None:
        self.settings = settings
        self.run = run
        self.workers = workers
        self.timeline = timeline
        # Each fault as it was injected, with the shards' owners just before it: the
        # per-fault waits (harness.chaos.waits) are measured from these.
        self.marks: list[Mark] = []

    async def run_plan(self) -> None:
        """Inject the plan's faults at their times after the start of the load, each
        after reading who serves which shard."""
        for fault in self.run.plan:
            wait = self.timeline.started + fault.at_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            before = await owners(self.workers.all)
            self.marks.append(Mark(fault, time.monotonic(), self.timeline.elapsed(), before))
            await self.inject(fault)

    async def inject(self, fault: Fault) -> None:
        if fault.kind == "add_worker":
            await self._scale()
        elif fault.kind in ("kill9", "sigstop"):
            await self._worker_fault(fault)
        elif fault.kind == "broker_restart" and cluster.kafka_cluster_in_use(self.settings):
            await self._cluster_fault(fault)
        elif fault.kind in ("broker_restart", "pg_restart", "redis_flush"):
            await self._service_fault(fault)
        elif fault.kind in CLUSTER_KINDS:
            await self._cluster_fault(fault)
        else:
            raise ValueError(f"unknown fault {fault.kind!r}")

    def _struck(self, n: int) -> None:
        """Note that the fault being injected struck worker `n` (for its waits)."""
        if self.marks:
            self.marks[-1].struck = n

    async def _scale(self) -> None:
        """A worker joins the group; at the most workers, the newest leaves instead, so
        that the group changes either way (a clean leave: SIGTERM, it flushes and goes)."""
        if len(self.workers.live()) >= MAX_WORKERS:
            n = max(i for i, w in enumerate(self.workers.all) if w in self.workers.live())
            self._struck(n)
            self.workers.retired.add(n)
            code = await self.workers.all[n].stop()
            self.timeline.note(
                f"add_worker: {MAX_WORKERS} workers already; worker-{n} left instead"
                f" (SIGTERM, exit {code})"
            )
        else:
            await self.workers.add()
            self.timeline.note(f"add_worker: worker-{len(self.workers.all) - 1} started")
        self.run.carried_out.append("add_worker")

    async def _worker_fault(self, fault: Fault) -> None:
        kind = fault.kind
        workers = self.workers
        picked = workers.pick(fault) if kind == "kill9" else await workers.pick_serving(fault)
        if picked is None:
            why = "no live worker" if kind == "kill9" else "no worker serving a shard"
            self.timeline.note(f"{kind} skipped: {why}")
            self.run.skipped.append(f"t+{fault.at_s:.1f}s {kind}: {why}")
            return
        n, worker = picked
        self._struck(n)
        if kind == "kill9":
            await self._kill9(fault, n, worker)
        else:
            await self._zombie(n, worker)

    async def _kill9(self, fault: Fault, n: int, worker: EngineProcess) -> None:
        """SIGKILL, a pause, then a restart (without the state directory if planned)."""
        self.workers.killed.add(n)
        code = await worker.kill()
        self.timeline.note(f"kill9: worker-{n} killed (SIGKILL, exit {code})")
        if code == -signal.SIGKILL:
            self.run.carried_out.append("kill9")
        else:  # it had exited already: not this fault
            self.run.skipped.append(f"t+{fault.at_s:.1f}s kill9: worker-{n} exit {code}")
        await asyncio.sleep(fault.pause_s)
        if fault.lose_disk:
            shutil.rmtree(worker.data_dir, ignore_errors=True)
        await worker.start(wait=False)
        self.workers.killed.discard(n)
        self.timeline.note(
            f"kill9: worker-{n} restarted"
            + (" without its state directory" if fault.lose_disk else "")
        )

    async def _service_fault(self, fault: Fault) -> None:
        """The broker or PostgreSQL stopped and started again, or Redis flushed."""
        note = self.timeline.note
        if fault.kind == "broker_restart":
            note("broker_restart: stopping the Kafka broker (SIGTERM)")
            took = await faults.restart_broker(down_s=fault.pause_s)
            note(f"broker_restart: broker back, {took:.1f}s after the stop")
        elif fault.kind == "pg_restart":
            note("pg_restart: stopping PostgreSQL (fast)")
            took = await faults.restart_postgres(self.settings.pg_dsn, down_s=fault.pause_s)
            note(f"pg_restart: PostgreSQL back after {took:.1f}s")
        else:
            keys = await faults.flush_redis(
                self.settings.redis_url, cluster=self.settings.redis_cluster
            )
            note(f"redis_flush: FLUSHDB dropped {keys} keys")
        self.run.carried_out.append(fault.kind)

    async def _cluster_fault(self, fault: Fault) -> None:
        """One broker of the three-broker cluster killed (broker_kill9), stopped cleanly
        (broker_restart on the cluster) or paused (broker_sigstop), or one Redis Cluster
        master killed; each brought back as its script does (harness.cluster). Which
        broker or master: the plan's `pick` among those there are when it strikes."""
        note = self.timeline.note
        kind = fault.kind
        if kind == "redis_master_kill9":
            masters = await cluster.redis_masters()
            port = cluster.pick(masters, fault.pick)
            note(f"redis_master_kill9: killing the master on {port} (SIGKILL) of {masters}")
            took = await cluster.kill_redis_master(port, down_s=fault.pause_s)
            note(f"redis_master_kill9: the cluster is whole again, {took:.1f}s after the kill")
        else:
            n = cluster.pick(sorted(cluster.KAFKA_BROKERS.values()), fault.pick)
            if kind == "broker_sigstop":
                note(f"broker_sigstop: broker-{n} stopped (SIGSTOP) for {fault.pause_s:.1f}s")
                await cluster.pause_broker(n, stopped_s=fault.pause_s)
                note(f"broker_sigstop: broker-{n} continued (SIGCONT)")
            else:
                sig = signal.SIGKILL if kind == "broker_kill9" else signal.SIGTERM
                note(f"{kind}: stopping cluster broker-{n} ({signal.Signals(sig).name})")
                took = await cluster.kill_broker(n, down_s=fault.pause_s, sig=sig)
                note(f"{kind}: the cluster is whole again, {took:.1f}s after the stop")
        self.run.carried_out.append(kind)

    async def _zombie(self, n: int, worker: EngineProcess) -> None:
        """SIGSTOP `worker` past its session timeout, and keep it stopped until every
        shard it served is served by another worker (bounded), then SIGCONT: a zombie
        whose shards have moved on and who must have been fenced."""
        assert worker.proc is not None
        served = await self.workers.serving(worker)
        worker.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        self.timeline.note(f"sigstop: worker-{n} stopped (SIGSTOP), serving {served}")
        taken: set[int] = set()
        while True:
            await asyncio.sleep(0.5)
            others = [w for w in self.workers.live() if w is not worker]
            now = set()
            for other in others:
                now |= set(await self.workers.serving(other))
            taken = now & set(served)
            elapsed = time.monotonic() - stopped
            if elapsed >= STOP_S and (taken == set(served) or elapsed >= STOP_S + STOP_MORE_S):
                break
        worker.proc.send_signal(signal.SIGCONT)
        zombie = Zombie(n, served, sorted(taken), round(time.monotonic() - stopped, 1))
        self.run.zombies.append(zombie)
        self.run.carried_out.append("sigstop")
        self.timeline.note(
            f"sigstop: worker-{n} continued (SIGCONT) after {zombie.stopped_s:.0f}s;"
            f" of its shards {served}, {zombie.taken_over} were served by others"
        )
