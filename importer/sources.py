"""Where the rows come from: a CSV file (its lines decoded and checked one by one) or a
PostgreSQL query (a server-side cursor in one read-only snapshot), each restartable so
that the check and the produce pass read the same rows."""

from __future__ import annotations

import asyncio
import codecs
import csv
from collections.abc import (
    AsyncGenerator,
    Iterable,
    Iterator,
)
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol

import asyncpg
import msgspec

from core.settings import Settings
from importer.check import check_fields, check_header, check_values
from importer.rows import (
    BadRow,
    ImportFailed,
    Problem,
    Verdict,
    connect_timeout_s,
    line_bytes_max,
    one_line,
    pg_fetch_rows,
)
from sinks import pg


def csv_verdicts(lines: Iterable[str]) -> Iterator[Verdict]:
    """Every data record of a CSV text, checked; blank lines are skipped. A bad header
    or malformed CSV ends it with a fatal BadRow."""
    reader = csv.reader(lines, strict=True)
    end = 0  # the line the previous record ended on
    columns: list[str] | None = None
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            if columns is None:
                yield BadRow(1, Problem.BAD_HEADER, "the file is empty")
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            yield BadRow(end + 1, Problem.MALFORMED_CSV, str(exc))
            return
        line, end = end + 1, reader.line_num
        if columns is None:
            header = check_header(fields)
            if isinstance(header, BadRow):
                yield header._replace(line=line)
                return
            columns = header
        elif fields:
            yield check_fields(line, columns, fields)


def decoded_lines(raw: BinaryIO) -> Iterator[str]:
    """A file's lines as text, decoded one by one, so that a byte that is not UTF-8 is
    reported on its own line (a text file decodes whole chunks, naming none)."""
    first = True
    while line := raw.readline(line_bytes_max + 1):
        if len(line) > line_bytes_max:
            raise csv.Error(f"a line longer than {line_bytes_max:,} bytes")
        if first and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]  # spreadsheets write one
        first = False
        yield line.decode()


class Source(Protocol):
    """A restartable source of checked rows: each `verdicts()` reads from the start."""

    name: str
    unit: str

    async def __aenter__(self) -> Source: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def verdicts(self) -> AsyncGenerator[Verdict, None]: ...


class CsvSource:
    """A CSV file with the header account,asset,amount (UTF-8, a BOM allowed)."""

    unit = "line"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    async def __aenter__(self) -> CsvSource:
        # Fail before connecting to anything: the file must be there and readable.
        try:
            self._open().close()
        except OSError as exc:
            raise ImportFailed(f"cannot read {self.path}: {exc.strerror or exc}") from None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def _open(self) -> BinaryIO:
        return self.path.open("rb")

    async def verdicts(self) -> AsyncGenerator[Verdict, None]:
        try:
            with self._open() as raw:
                for n, verdict in enumerate(csv_verdicts(decoded_lines(raw))):
                    yield verdict
                    if n % 1000 == 999:
                        await asyncio.sleep(0)  # let the producer and the reader run
        except OSError as exc:
            raise ImportFailed(f"cannot read {self.path}: {exc.strerror or exc}") from None


class PgSource:
    """The rows of a query, through a server-side cursor, in one read-only snapshot."""

    unit = "row"

    def __init__(self, dsn: str, query: str, *, shown_dsn: str) -> None:
        self.dsn = dsn
        self.query = query
        self.shown_dsn = shown_dsn
        self.name = f"PostgreSQL query at {shown_dsn}"
        self._conn: Any = None
        self._statement: Any = None
        self._columns: list[str] | BadRow = []

    @classmethod
    def of(cls, settings: Settings, query: str, *, dsn: str | None = None) -> PgSource:
        """The query on `dsn`, by default the deployment's own database (TALLY_PG_DSN);
        messages show the DSN with its password masked."""
        dsn = dsn or settings.pg_dsn
        shown = msgspec.structs.replace(settings, pg_dsn=dsn).redacted()["pg_dsn"]
        return cls(dsn, query, shown_dsn=shown)

    async def __aenter__(self) -> PgSource:
        try:
            self._conn = await pg.connect(self.dsn, None, timeout_s=connect_timeout_s)
        except (OSError, TimeoutError, asyncpg.PostgresError, ValueError) as exc:
            raise ImportFailed(
                f"PostgreSQL unreachable at {self.shown_dsn}: {one_line(exc)}"
            ) from None
        try:
            # Both passes read one snapshot; read-only, so the query cannot write.
            await self._conn.transaction(isolation="repeatable_read", readonly=True).start()
            self._statement = await self._conn.prepare(self.query)
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self._conn.close()
            raise ImportFailed(f"the query failed: {one_line(exc)}") from None
        self._columns = check_header([a.name for a in self._statement.get_attributes()])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            await self._conn.close()  # ends the read-only transaction: nothing to keep

    async def verdicts(self) -> AsyncGenerator[Verdict, None]:
        if isinstance(self._columns, BadRow):
            yield self._columns
            return
        number = 0
        try:
            async for record in self._statement.cursor(prefetch=pg_fetch_rows):
                number += 1
                yield check_values(number, dict(record.items()))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise ImportFailed(f"the query failed at row {number + 1}: {one_line(exc)}") from None
