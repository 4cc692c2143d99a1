"""What a chaos run did and found: its record (the plan, what happened when, the
faults injected and skipped, the zombies, the checks), its clock, and the printed report
(which, for a failed run, says how to repeat it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.chaos.plan import Fault
from harness.checks import Check
from harness.errors import HarnessError
from harness.waits import GroupWait


@dataclass
class Zombie:
    """A worker SIGSTOPped past its session timeout: the shards it served when it was
    stopped, and those of them other workers served before it was continued. A shard is
    served only after the group assigned it to its new owner in a later generation, and
    after that owner waited out every transaction the old owner had open for it: the
    group coordinator refuses the offsets of the old owner's next transaction (its
    generation is stale), so a zombie whose shards were all taken over cannot commit
    anything for them."""

    worker: int
    served: list[int]
    taken_over: list[int]
    stopped_s: float


@dataclass
class FaultWaits:
    """How long results waited around one fault (harness.chaos.waits): on the shards
    whose owner did not change (kept), on those that moved, and on those of the worker
    the fault struck, if it struck one (then not in kept or moved)."""

    at_s: float
    kind: str
    owners_before: dict[int, int]
    owners_after: dict[int, int]
    kept: GroupWait
    moved: GroupWait
    struck_worker: int | None = None
    struck: GroupWait | None = None

    def line(self) -> str:
        def part(g: GroupWait) -> str:
            if not g.shards:
                return f"{g.name} none"
            lost = f", {g.unanswered} unanswered" if g.unanswered else ""
            return (
                f"{g.name} {g.shards} wait {g.max_wait_s:.1f}s silence {g.max_silence_s:.1f}s{lost}"
            )

        parts = [part(self.kept), part(self.moved)]
        if self.struck_worker is not None and self.struck is not None:
            parts.append(part(self.struck))
        return f"t+{self.at_s:5.1f}s  {self.kind:<15} " + "; ".join(parts)


@dataclass
class Run:
    seed: int
    duration_s: float
    rate: int
    plan: list[Fault]
    prefix: str = ""
    produced: int = 0
    resent: int = 0
    injected: list[str] = field(default_factory=list)  # what happened, with times
    carried_out: list[str] = field(default_factory=list)  # the kind of each fault injected
    skipped: list[str] = field(default_factory=list)  # faults of the plan not injected, why
    zombies: list[Zombie] = field(default_factory=list)
    waits: list[FaultWaits] = field(default_factory=list)  # per fault injected, in order
    checks: list[Check] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    sinks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every check held and every planned fault was injected: a fault skipped at
        run time leaves less chaos than the plan, and checks that held without it
        prove less than the run claims."""
        checked = bool(self.checks) and all(c.ok for c in self.checks)
        return checked and self.faults_injected

    @property
    def faults_injected(self) -> bool:
        planned = sorted(f.kind for f in self.plan)
        return not self.skipped and sorted(self.carried_out) == planned


class ChaosError(HarnessError):
    """The run could not be carried out (not a finding: a broken setup)."""


class Timeline:
    """The run's clock (from the start of the load) and its log of what happened."""

    def __init__(self, run: Run, say: Callable[[str], None]) -> None:
        self.run = run
        self.say = say
        self.started = 0.0

    def start(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def note(self, text: str) -> None:
        line = f"t+{self.elapsed():5.1f}s  {text}"
        self.run.injected.append(line)
        self.say(f"chaos: {line}")


def render(run: Run) -> str:
    lines = [
        f"chaos run seed={run.seed} duration={run.duration_s:.0f}s rate={run.rate}/s"
        f" prefix={run.prefix}: {'PASSED' if run.ok else 'FAILED'} in {run.seconds:.0f}s",
        f"  load: {run.produced} records acknowledged by Kafka, {run.resent} sent again",
        "  fault plan:",
        *(f"    {f.line()}" for f in run.plan),
        "  what happened:",
        *(f"    {line}" for line in run.injected),
        f"  injected: {', '.join(run.carried_out) or 'nothing'}"
        + (f"; NOT injected: {'; '.join(run.skipped)}" if run.skipped else "")
        + ("" if run.faults_injected else " (the run fails: not every planned fault)"),
        "  longest wait / silence for a result per fault: shards kept, moved, and the struck"
        " worker's:",
        *([f"    {w.line()}" for w in run.waits] or ["    none measured"]),
        "  checks:",
    ]
    width = max((len(c.name) for c in run.checks), default=10)
    lines += [
        f"    [{'ok' if c.ok else 'FAIL':>4}] {c.name:<{width}}  {c.detail}" for c in run.checks
    ]
    lines += ["  sinks:", *(f"    {line}" for line in run.sinks)]
    lines.append("  workers:")
    for n, w in enumerate(run.workers):
        counts = w.get("counts", {})
        shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        lines.append(f"    worker-{n}: serving {w.get('serving', '?')}; {shown}; log {w['log']}")
    if not run.ok:
        lines.append(
            f"  reproduce: make chaos SEED={run.seed} DURATION={run.duration_s:.0f}"
            f"  (or: tally chaos --seed {run.seed} --duration {run.duration_s:.0f})"
        )
    return "\n".join(lines)
