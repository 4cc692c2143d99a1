"""`tally import`: opening balances from a CSV file or a PostgreSQL query, produced as
deposits whose command ids derive from (account, asset), so that running the same import
again applies nothing twice.

The source is read twice. The first pass checks every row and finds the (account, asset)
pairs that occur more than once; nothing is produced until it has read the whole source,
which is what lets `--strict` refuse a source with any bad row and lets a duplicated pair
be refused on all of its rows (the import cannot know which amount is right). The second
pass produces the good rows. A PostgreSQL source runs both passes in one read-only
REPEATABLE READ transaction, so both see the same snapshot; a CSV file that changes
between the passes is detected by a fingerprint of the rows and reported.

The parts: `rows` (what a row is, the limits), `check` (the pure row checks and the
first pass), `sources` (CSV and PostgreSQL), `publish` (producing and waiting for the
results), `report` (what the engine answered, and the summary); `run` puts them together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from core.progress import Progress
from core.settings import Settings
from importer.check import Checker, Fingerprint
from importer.publish import Publisher, Sender
from importer.report import Report, render
from importer.rows import FATAL, BadRow, ImportFailed, in_flight_max
from importer.sources import CsvSource, PgSource, Source
from topics.names import deployment_topics

# What `tally import` calls; the parts live in the modules beside this one.
__all__ = ["CsvSource", "ImportFailed", "Options", "PgSource", "Report", "Source", "render", "run"]


@dataclass(frozen=True)
class Options:
    strict: bool = False
    wait: bool = True
    dry_run: bool = False
    # With no acknowledgement or result for this long, the import stops waiting.
    stall_timeout_s: float = 60.0
    window: int = in_flight_max


async def run(
    settings: Settings,
    source: Source,
    options: Options,
    *,
    say: Callable[[str], None],
    sender: Sender | None = None,
) -> Report:
    """Check the source, then produce its good rows and (unless told not to) wait for
    the engine's results. Raises ImportFailed when a service or the source cannot be
    reached; everything about the rows is in the report. `sender` replaces the Kafka
    `Publisher` (tests)."""
    topics = deployment_topics(settings)
    report = Report(
        source=source.name,
        unit=source.unit,
        topic=topics.commands.name,
        strict=options.strict,
        wait=options.wait and not options.dry_run,
        dry_run=options.dry_run,
    )
    async with source:
        publisher: Sender | None = None
        if not options.dry_run:
            publisher = sender or Publisher(settings, wait=options.wait, window=options.window)
        try:
            if publisher is not None:
                await publisher.connect()
            checker = await _check(source, say)
            report.checked(checker)
            if publisher is not None and not report.blocked and checker.good:
                await publisher.open()
                await _produce(source, checker, publisher, report, options, say)
        finally:
            if publisher is not None:
                await publisher.stop()
    return report


async def _check(source: Source, say: Callable[[str], None]) -> Checker:
    checker = Checker(unit=source.unit)
    with Progress("import: checked", None, unit="rows", say=say) as progress:
        async with contextlib.aclosing(source.verdicts()) as verdicts:
            async for verdict in verdicts:
                checker.feed(verdict)
                if checker.fatal is not None:
                    break
                progress.add(1)
    return checker


async def _produce(
    source: Source,
    checker: Checker,
    publisher: Sender,
    report: Report,
    options: Options,
    say: Callable[[str], None],
) -> None:
    fingerprint = Fingerprint()
    stalled = False
    with Progress("import: produced", checker.good, unit="deposits", say=say) as progress:
        async with contextlib.aclosing(source.verdicts()) as verdicts:
            async for verdict in verdicts:
                if isinstance(verdict, BadRow) and verdict.problem in FATAL:
                    break
                fingerprint.add(verdict)
                row = checker.admitted(verdict)
                if row is None:
                    continue
                if not await publisher.send(row, stall_s=options.stall_timeout_s):
                    stalled = True
                    break
                progress.add(1)
    report.produced = publisher.produced
    report.changed = not stalled and fingerprint != checker.fingerprint
    if not stalled:
        stalled = not await _finish(publisher, options, say)
    report.outcomes = publisher.outcomes
    report.not_sent = publisher.failed
    report.unanswered = publisher.in_flight
    report.stalled_s = options.stall_timeout_s if stalled else None


async def _finish(publisher: Sender, options: Options, say: Callable[[str], None]) -> bool:
    if not options.wait:
        return await publisher.finish(stall_s=options.stall_timeout_s)
    with Progress("import: answered", publisher.produced, unit="results", say=say) as progress:
        return await publisher.finish(stall_s=options.stall_timeout_s, progress=progress)
