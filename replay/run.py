"""`tally replay`: rebuild one sink store from the events topic, from the beginning up to
the end offsets taken at the start, then stop and say how it went.

The replay is the sink itself (a `SinkRunner` over the same store) in its replay mode:
every partition assigned statically, no consumer group, nothing committed to Kafka. The
stores absorb repeats (PostgreSQL inserts ON CONFLICT and upserts balances forward only;
Redis is last-writer-wins on `seq`), so it may run into an empty store or over a full
one. An event the live sink dead-letters (undecodable, out of the schema's bounds, or
refused by the store for its content) the replay skips the same way, without sending
its dead letter again, and counts. It refuses to run while a live sink of the same
target is a member of its consumer group, unless forced, and fails fast, naming the
store, when the store or Kafka does not answer.

Offsets: see `replay.offsets`.

What it cannot see: a sink run as `tally sink --processes N` assigns its partitions
itself and joins no group, so it is not listed as a member and does not stop a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import Callable

from core.logs import setup_logging
from core.progress import Progress
from core.settings import Settings
from replay.checks import Plan, ReplayError, check_store, describe_store, kafka_plan
from replay.offsets import OffsetsAside, offsets_aside_suffix, settle_offsets
from sinks import service
from sinks.runner import Batch, SinkRunner, Store
from topics.names import deployment_topics, sink_group

# What `tally replay`, the benchmarks and the tests call.
__all__ = ["Replay", "ReplayError", "Summary", "run"]


@dataclasses.dataclass(frozen=True)
class Summary:
    target: str
    store: str
    events: int
    entries: int
    undecodable: int
    offsets: int
    seconds: float
    completed: bool

    @property
    def events_per_s(self) -> float:
        return self.events / max(self.seconds, 1e-9)

    @property
    def entries_per_s(self) -> float:
        return self.entries / max(self.seconds, 1e-9)

    def lines(self) -> list[str]:
        state = "done" if self.completed else "INTERRUPTED (the store holds what was written)"
        lines = [
            f"replay {self.target}: {state}, into {self.store}",
            f"  events       {self.events:>12,}",
            f"  entries      {self.entries:>12,}",
            f"  seconds      {self.seconds:>12.1f}",
            f"  events/s     {self.events_per_s:>12,.0f}",
            f"  entries/s    {self.entries_per_s:>12,.0f}",
        ]
        if self.undecodable:
            lines.append(
                f"  undecodable  {self.undecodable:>12,}  (skipped, as the live sink "
                "dead-letters them: not decodable, out of the schema's bounds, or refused "
                "by the store)"
            )
        return lines


class Replay:
    """One replay of one target. `force` replays beside a live sink; `store` replaces
    the store the sink would build (the tests use one with denser breakpoints); `say`
    and `tty` go to the progress display (default: stderr, a bar if it is a terminal)."""

    def __init__(
        self,
        settings: Settings,
        target: str,
        *,
        force: bool = False,
        store: Store | None = None,
        say: Callable[[str], None] | None = None,
        tty: bool | None = None,
    ) -> None:
        self.settings = settings
        self.target = target
        self.force = force
        self.store = store if store is not None else service.store_for(settings, target)
        self.say = say
        self.tty = tty
        self.topic = deployment_topics(settings).events.name
        self.runner: SinkRunner | None = None
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True
        if self.runner is not None:
            self.runner.stop()

    async def run(self) -> Summary:
        plan = await self.check()
        started = time.monotonic()
        completed = await self._replay(plan)
        runner = self.runner
        assert runner is not None
        return Summary(
            target=self.target,
            store=describe_store(self.settings, self.target),
            events=runner.written_events,
            entries=runner.written_entries,
            undecodable=runner.dead_lettered,
            offsets=plan.offsets,
            seconds=time.monotonic() - started,
            completed=completed,
        )

    async def check(self) -> Plan:
        """Kafka (the topic, its offsets, the live group), then the store; raise
        ReplayError with the reason when the replay must not or cannot run."""
        plan, members = await kafka_plan(self.settings, self.topic, self.target)
        if members and not self.force:
            group = sink_group(self.settings, self.target)
            raise ReplayError(
                f"refusing to replay into {describe_store(self.settings, self.target)}: "
                f"consumer group {group} has {len(members)} live member(s) "
                f"({'; '.join(members)}), so a sink is writing to it now. Stop that sink "
                "first (a sink killed moments ago stays listed until its session times "
                "out), or pass --force to replay beside it"
            )
        await check_store(self.settings, self.target, self.store)
        return plan

    async def _replay(self, plan: Plan) -> bool:
        """Run the sink over the plan; True when it reached the end offsets."""
        store = self.store
        if self.target == "postgres":
            store = OffsetsAside(store, plan.topic + offsets_aside_suffix)
        runner = self.runner = service.runner_for(
            self.settings, self.target, sorted(plan.end), store=store, until=dict(plan.end)
        )
        if self._stopped:
            runner.stop()
        # The bar counts offsets: events, plus the transaction markers between them (one
        # per engine transaction and partition), so it ends exactly at the total.
        with Progress(
            f"replay {self.target}", plan.offsets, unit="events", say=self.say, tty=self.tty
        ) as progress:
            runner.on_batch = _advance(progress, dict(plan.beginning))
            try:
                await runner.run()
            except BaseException:
                progress.label += " (failed)"
                if self.target == "postgres":
                    with contextlib.suppress(Exception):  # the failure is what to report
                        await settle_offsets(self.settings, plan, raise_to_end=False)
                raise
            completed = not self._stopped
            if completed:
                progress.add(plan.offsets - progress.done)  # markers after the last event
            else:
                progress.label += " (interrupted)"
            if self.target == "postgres":
                await settle_offsets(self.settings, plan, raise_to_end=completed)
        return completed


def _advance(progress: Progress, position: dict[int, int]) -> Callable[[Batch], None]:
    """A runner's on_batch callback moving `progress` by the offsets each batch covers."""

    def on_batch(batch: Batch) -> None:
        moved = 0
        for partition, offset in batch.offsets.items():
            moved += offset - position.get(partition, offset)
            position[partition] = offset
        progress.add(moved)

    return on_batch


def run(
    settings: Settings,
    target: str,
    *,
    force: bool,
    out: Callable[[str], None],
) -> int:
    """The `tally replay` command: 0 when done, 1 when interrupted (SIGINT, SIGTERM);
    a ReplayError when it must not or cannot start (the CLI exits with its status, 2)."""
    setup_logging(settings, f"replay {target}", quiet=True)
    summary = asyncio.run(_run(Replay(settings, target, force=force)))
    for line in summary.lines():
        out(line)
    return 0 if summary.completed else 1


async def _run(job: Replay) -> Summary:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, job.stop)
    return await job.run()
