"""`tally import` in one call: the source picked from the options, logging for a command
that prints its own one-line errors, then the import, which returns its report
(`importer.run.render` prints it)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from core.logs import setup_logging
from core.settings import Settings
from importer.run import CsvSource, Options, PgSource, Report, Source
from importer.run import run as run_import


def source_of(
    settings: Settings, file: Path | None, pg_query: str | None, pg_dsn: str | None
) -> Source:
    """The rows to import: the query's on `pg_dsn` (default TALLY_PG_DSN) when one is
    given, else the CSV file's."""
    if pg_query is not None:
        return PgSource.of(settings, pg_query, dsn=pg_dsn)
    if file is None:
        raise ValueError("an import reads a file or a query")
    return CsvSource(file)


def run(
    settings: Settings, source: Source, options: Options, *, say: Callable[[str], None]
) -> Report:
    """Import the source's rows; raises ImportFailed when a service or the source cannot
    be reached."""
    setup_logging(settings, "import", quiet=True)
    # Its connection errors would repeat the one line the import fails with.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    return asyncio.run(run_import(settings, source, options, say=say))
