"""What the engine answered for each produced row, and the import's report as the CLI
prints it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from importer.check import Checker
from importer.rows import COMMAND_ID_PREFIX, BadRow, Row, listed_max
from topics.schema import Result, Status


def outcome_of(result: Result) -> str:
    """A result as the report counts it: `applied`, `already imported` (a duplicate of
    an applied deposit), `previously rejected: <reason>` (a duplicate of a rejected one:
    not in the ledger), or `rejected: <reason>`."""
    if result.status is Status.APPLIED:
        return "applied"
    if result.status is Status.DUPLICATE:
        first = result.first
        if first is None or first.status is Status.APPLIED:
            return "already imported"
        return f"previously rejected: {first.reason}"
    return f"rejected: {result.reason}"


IMPORTED = frozenset({"applied", "already imported"})


@dataclass
class Outcomes:
    """Results of the produced rows, counted by outcome; rows not imported are listed."""

    listed_limit: int = listed_max
    counts: Counter[str] = field(default_factory=Counter)
    not_imported: list[tuple[Row, str]] = field(default_factory=list)

    def add(self, row: Row, outcome: str) -> None:
        self.counts[outcome] += 1
        if outcome not in IMPORTED and len(self.not_imported) < self.listed_limit:
            self.not_imported.append((row, outcome))

    @property
    def answered(self) -> int:
        return self.counts.total()

    @property
    def imported(self) -> int:
        return sum(n for outcome, n in self.counts.items() if outcome in IMPORTED)


@dataclass
class Report:
    """What one import did; `render` prints it, `exit_code` sums it up."""

    source: str
    unit: str  # "line" (CSV) or "row" (query)
    topic: str
    strict: bool = False
    wait: bool = True
    dry_run: bool = False
    rows: int = 0
    good: int = 0
    bad: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    fatal: BadRow | None = None
    produced: int = 0
    not_sent: int = 0
    outcomes: Outcomes = field(default_factory=Outcomes)
    # Produced but not answered (with --no-wait: not acknowledged) when the import ended.
    unanswered: int = 0
    stalled_s: float | None = None
    changed: bool = False

    def checked(self, checker: Checker) -> None:
        self.rows, self.good, self.bad = checker.rows, checker.good, checker.bad
        self.bad_rows = sorted(checker.bad_rows)
        self.fatal = checker.fatal

    @property
    def blocked(self) -> bool:
        """Nothing is produced: the source is unreadable, or --strict found bad rows."""
        return self.fatal is not None or (self.strict and self.bad > 0)

    @property
    def complete(self) -> bool:
        """Every row of the source is in the ledger (or, without waiting, sent)."""
        if self.blocked or self.bad or self.changed or self.not_sent or self.unanswered:
            return False
        if self.dry_run:
            return True
        if not self.wait:
            return self.produced == self.good
        return self.outcomes.imported == self.good

    def exit_code(self) -> int:
        return 0 if self.complete else 1


def render(report: Report) -> str:
    """The report as the CLI prints it."""
    out = [f"import from {report.source} to {report.topic}"]
    if report.fatal is not None:
        out.append(f"  {_where(report, report.fatal)}: {report.fatal.problem}: "
                   f"{report.fatal.detail}")  # fmt: skip
        out.append("nothing was produced")
        return "\n".join(out)
    out.append(f"{report.unit}s: {report.rows:,} read, {report.good:,} good, {report.bad:,} bad")
    if report.bad_rows:
        out.append(f"bad {report.unit}s:")
        out.extend(f"  {_where(report, b)}: {b.problem}: {b.detail}" for b in report.bad_rows)
        if report.bad > len(report.bad_rows):
            out.append(f"  ... and {report.bad - len(report.bad_rows):,} more")
    out.extend(_produced_lines(report))
    out.append(_verdict_line(report))
    return "\n".join(out)


def _where(report: Report, bad: BadRow) -> str:
    return "query" if bad.line == 0 else f"{report.unit} {bad.line}"


def _produced_lines(report: Report) -> list[str]:
    if report.dry_run:
        return ["dry run: nothing was produced"]
    if report.blocked:
        return ["--strict: nothing was produced"]
    if not report.good:
        return ["no good rows: nothing was produced"]
    out = [f"produced: {report.produced:,} deposits (ids {COMMAND_ID_PREFIX}<account>:<asset>)"]
    if report.not_sent:
        out.append(f"  not acknowledged by Kafka: {report.not_sent:,}")
    if report.changed:
        out.append("  the source changed between the check and the produce pass: re-run")
    if not report.wait:
        return out
    out.append("results:")
    out.extend(f"  {outcome}: {n:,}" for outcome, n in sorted(report.outcomes.counts.items()))
    if report.unanswered or report.stalled_s is not None:
        out.append(f"  not answered: {report.unanswered:,}")
    if report.stalled_s is not None:
        out.append(
            f"  no result came for {report.stalled_s:.0f}s: is an engine running on this "
            f"topic? (re-running the import is safe)"
        )
        if report.produced < report.good:
            out.append(f"  not produced: {report.good - report.produced:,}")
    if report.outcomes.not_imported:
        out.append(f"not imported {report.unit}s:")
        out.extend(
            f"  {report.unit} {row.line} ({row.account}, {row.asset}, {row.amount}): {outcome}"
            for row, outcome in sorted(report.outcomes.not_imported)
        )
        more = report.outcomes.answered - report.outcomes.imported
        more -= len(report.outcomes.not_imported)
        if more:
            out.append(f"  ... and {more:,} more")
    return out


def _verdict_line(report: Report) -> str:
    if report.dry_run:
        return "check passed" if report.complete else "check FAILED (exit 1)"
    if report.complete:
        return "complete: every row is in the ledger" if report.wait else "complete: all sent"
    return "INCOMPLETE: not every row was imported (exit 1)"
