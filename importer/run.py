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

The row checks (`check_header`, `check_values`, `csv_verdicts`, `Checker`) and the
tallying of results (`Outcomes`, `Report`) are pure; `CsvSource`, `PgSource` and
`Publisher` do the I/O; `run` puts them together.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import decimal
import enum
import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, NamedTuple, Protocol

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from core.errors import CANNOT_RUN, TallyError
from core.progress import Progress
from core.settings import Settings
from sinks import pg
from topics import limits
from topics.admin import TopicMismatch, ensure_topics
from topics.codec import decode_result, encode
from topics.names import deployment_topics
from topics.producer import durable_producer
from topics.schema import Deposit, Result, Status, source, source_in
from topics.shard import shard_of
from topics.specs import Topics

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = ("account", "asset", "amount")
COMMAND_ID_PREFIX = "open:"

# The duplicate check keeps one entry per distinct (account, asset) of the source, about
# 120 bytes each: this bounds it near 600 MB. A larger import is split into several
# runs; each is idempotent on its own, and the engine still answers a pair repeated
# across runs (`duplicate`, or `command_id_reused` for another amount).
rows_max = 5_000_000
# Bad rows and not-imported rows listed in the report; the rest are counted.
listed_max = 1000
# Produced commands not yet answered by the engine (with --no-wait: not yet acknowledged
# by Kafka). It bounds the memory the waiting takes, and the import's lead on the engine.
in_flight_max = 20_000
# A CSV line is about 100 bytes (64 + 12 + 19 digits); a longer one is not read whole.
line_bytes_max = 64 * 1024
# Rows fetched from PostgreSQL per round trip of the server-side cursor.
pg_fetch_rows = 2000
# Reaching a service: a dead address fails the import after this, not after a client's
# default (aiokafka waits 40 s per request).
connect_timeout_s = 15.0
# How long `finish` waits for Kafka to acknowledge the last records.
flush_timeout_s = 60.0
poll_timeout_ms = 200

# Amounts as text: an optional sign and digits, nothing else ("1_000", " 5" and "0x10"
# are refused although Python's int() takes them). Decimal points and exponents are
# named apart, because a float in a balance file usually means major units.
_INTEGER_RE = re.compile(r"([+-]?)([0-9]+)")
_DECIMAL_RE = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))([eE][+-]?[0-9]+)?")
_ACCOUNT_RE = re.compile(limits.ACCOUNT_ID_PATTERN)
_ASSET_RE = re.compile(limits.ASSET_PATTERN)
_AMOUNT_DIGITS_MAX = len(str(limits.AMOUNT_MAX))


class ImportFailed(TallyError):
    """The import could not run: a source or service unreachable, a query that fails.
    The message is one line naming what failed."""

    exit_code = CANNOT_RUN


# ---------------------------------------------------------------------------------------
# Rows: the pure checks


class Problem(enum.StrEnum):
    """Why a row is not imported. A row is checked in this order and reports the first
    problem found; the first three stop the whole import (the source cannot be read on)."""

    BAD_HEADER = "bad_header"
    MALFORMED_CSV = "malformed_csv"
    TOO_MANY_ROWS = "too_many_rows"
    EXTRA_FIELD = "extra_field"
    MISSING_FIELD = "missing_field"
    BAD_ACCOUNT = "bad_account"
    BAD_ASSET = "bad_asset"
    AMOUNT_NOT_A_NUMBER = "amount_not_a_number"
    AMOUNT_FRACTIONAL = "amount_fractional"
    AMOUNT_NOT_POSITIVE = "amount_not_positive"
    AMOUNT_TOO_LARGE = "amount_too_large"
    DUPLICATE_ROW = "duplicate_row"


FATAL = frozenset({Problem.BAD_HEADER, Problem.MALFORMED_CSV, Problem.TOO_MANY_ROWS})


class BadRow(NamedTuple):
    """A row that is not imported. `line` is the CSV line (the header is line 1) or the
    query's row number; 0 means the query itself."""

    line: int
    problem: Problem
    detail: str


class Row(NamedTuple):
    """A good row: one deposit."""

    line: int
    account: str
    asset: str
    amount: int

    @property
    def command_id(self) -> str:
        return command_id(self.account, self.asset)

    def command(self) -> Deposit:
        return Deposit(
            command_id=self.command_id, account=self.account, asset=self.asset, amount=self.amount
        )


Verdict = Row | BadRow


def command_id(account: str, asset: str) -> str:
    """The deposit's id: "open:<account>:<asset>". One per balance, whatever the amount
    or the run, which is what makes a second import a `duplicate`. Account ids may hold
    ':' but assets never do, so the last ':' splits it back: two pairs never share an
    id. At most 5 + 64 + 1 + 12 = 82 characters of the command-id alphabet (128 allowed);
    the engine keeps ids per shard, and the account decides the shard."""
    return f"{COMMAND_ID_PREFIX}{account}:{asset}"


def check_header(names: Sequence[object]) -> list[str] | BadRow:
    """The column order of a CSV header or a query's result: exactly the names in
    COLUMNS, in any order."""
    got = [str(n) for n in names]
    if sorted(got) != sorted(COLUMNS):
        shown = ",".join(got) if got else "nothing"
        wanted = ",".join(COLUMNS)
        return BadRow(0, Problem.BAD_HEADER, f"expected the columns {wanted}, got {shown}")
    return got


def check_fields(line: int, columns: Sequence[str], fields: Sequence[object]) -> Verdict:
    """One CSV record, its fields in the header's order."""
    if len(fields) > len(columns):
        return BadRow(
            line,
            Problem.EXTRA_FIELD,
            f"{len(fields)} fields, the header has {len(columns)}",
        )
    return check_values(line, dict(zip(columns, fields, strict=False)))


def check_values(line: int, values: Mapping[str, object]) -> Verdict:
    """Check one row's values (text from a CSV file, typed values from PostgreSQL)."""
    missing = [c for c in COLUMNS if values.get(c) is None or values.get(c) == ""]
    if missing:
        return BadRow(line, Problem.MISSING_FIELD, f"no {' and no '.join(missing)}")
    account, asset = values["account"], values["asset"]
    if not isinstance(account, str) or not _ACCOUNT_RE.match(account):
        return BadRow(
            line, Problem.BAD_ACCOUNT, f"account {account!r} is not 1-64 of [A-Za-z0-9_.:-]"
        )
    if not isinstance(asset, str) or not _ASSET_RE.match(asset):
        return BadRow(line, Problem.BAD_ASSET, f"asset {asset!r} is not 1-12 of [A-Z0-9]")
    amount = check_amount(values["amount"])
    if isinstance(amount, tuple):
        return BadRow(line, *amount)
    return Row(line, account, asset, amount)


def check_amount(value: object) -> int | tuple[Problem, str]:
    """An amount in minor units, 1 to 2^127-1: an int, digits, or a PostgreSQL numeric
    without a fractional part. Never coerced from a float."""
    if isinstance(value, bool):
        return Problem.AMOUNT_NOT_A_NUMBER, f"amount {value!r} is a boolean"
    if isinstance(value, str):
        return _amount_of_text(value)
    if isinstance(value, float):
        return Problem.AMOUNT_FRACTIONAL, f"amount {value!r} is a float: give minor units"
    if isinstance(value, decimal.Decimal):
        return _amount_of_decimal(value)
    if isinstance(value, int):
        return _in_range(value, str(value))
    return Problem.AMOUNT_NOT_A_NUMBER, f"amount of type {type(value).__name__}"


def _amount_of_text(text: str) -> int | tuple[Problem, str]:
    match = _INTEGER_RE.fullmatch(text)
    if match is None:
        if _DECIMAL_RE.fullmatch(text):
            return Problem.AMOUNT_FRACTIONAL, f"amount {text!r} is not a whole number"
        return Problem.AMOUNT_NOT_A_NUMBER, f"amount {text!r} is not an integer"
    sign, digits = match.groups()
    digits = digits.lstrip("0") or "0"
    if digits == "0" or sign == "-":
        return Problem.AMOUNT_NOT_POSITIVE, f"amount {text!r} is not positive"
    if len(digits) > _AMOUNT_DIGITS_MAX:  # before int(): Python refuses 4,300+ digits
        return Problem.AMOUNT_TOO_LARGE, f"amount of {len(digits)} digits exceeds 2^127-1"
    return _in_range(int(digits), repr(text))


def _amount_of_decimal(value: decimal.Decimal) -> int | tuple[Problem, str]:
    if not value.is_finite():
        return Problem.AMOUNT_NOT_A_NUMBER, f"amount {value} is not a number"
    exponent = value.as_tuple().exponent
    # numeric(20,0) holds minor units; numeric(12,2) shows 100.00 for major units, and
    # reading that as 100 would be off by 100: any scale is refused, even zeros.
    if isinstance(exponent, int) and exponent < 0:
        return Problem.AMOUNT_FRACTIONAL, f"amount {value} has decimals: give minor units"
    return _in_range(int(value), str(value))


def _in_range(amount: int, shown: str) -> int | tuple[Problem, str]:
    if amount < 1:
        return Problem.AMOUNT_NOT_POSITIVE, f"amount {shown} is not positive"
    if amount > limits.AMOUNT_MAX:
        return Problem.AMOUNT_TOO_LARGE, f"amount {shown} exceeds 2^127-1"
    return amount


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


def _digest(data: str) -> int:
    # 128 bits: a collision among even billions of keys is far less likely than a
    # hardware fault, so the check can keep digests instead of the ids themselves.
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=16).digest(), "big")


@dataclass
class Fingerprint:
    """An order-independent digest of a pass's verdicts: both passes must read the
    same rows (a query's row order may differ between two runs, its rows may not)."""

    count: int = 0
    value: int = 0

    def add(self, verdict: Verdict) -> None:
        if isinstance(verdict, Row):
            text = f"{verdict.account}\0{verdict.asset}\0{verdict.amount}"
        else:
            text = f"{verdict.problem}\0{verdict.detail}"
        self.count += 1
        self.value = (self.value + _digest(text)) % (1 << 128)


class Checker:
    """The first pass: counts, the bad rows, and the (account, asset) pairs that occur on
    more than one row, all of whose rows are bad."""

    def __init__(
        self, *, unit: str = "line", rows_limit: int = rows_max, listed_limit: int = listed_max
    ) -> None:
        self.unit = unit
        self.rows_limit = rows_limit
        self.listed_limit = listed_limit
        self.rows = 0
        self.good = 0
        self.bad = 0
        self.bad_rows: list[BadRow] = []
        self.fatal: BadRow | None = None
        self.fingerprint = Fingerprint()
        self.duplicates: set[int] = set()
        self._first_line: dict[int, int] = {}

    def feed(self, verdict: Verdict) -> None:
        if isinstance(verdict, BadRow) and verdict.problem in FATAL:
            self._bad(verdict)
            self.fatal = verdict
            return
        self.rows += 1
        if self.rows > self.rows_limit:
            self.fatal = BadRow(
                verdict.line,
                Problem.TOO_MANY_ROWS,
                f"more than {self.rows_limit:,} rows: split the import into several runs",
            )
            self._bad(self.fatal)
            return
        self.fingerprint.add(verdict)
        if isinstance(verdict, BadRow):
            self._bad(verdict)
        else:
            self._good(verdict)

    def admitted(self, verdict: Verdict) -> Row | None:
        """Second pass: the row to produce, if this verdict is one."""
        if isinstance(verdict, Row) and _digest(verdict.command_id) not in self.duplicates:
            return verdict
        return None

    def _good(self, row: Row) -> None:
        key = _digest(row.command_id)
        first = self._first_line.setdefault(key, row.line)
        if first == row.line:
            self.good += 1
            return
        also = f"({row.account}, {row.asset}) is also on {self.unit}"
        if key not in self.duplicates:
            # The first row of the pair was counted good; it is not.
            self.duplicates.add(key)
            self.good -= 1
            self._bad(BadRow(first, Problem.DUPLICATE_ROW, f"{also} {row.line}"))
        self._bad(BadRow(row.line, Problem.DUPLICATE_ROW, f"{also} {first}"))

    def _bad(self, bad: BadRow) -> None:
        if bad.problem not in FATAL:
            self.bad += 1
        if len(self.bad_rows) < self.listed_limit:
            self.bad_rows.append(bad)


# ---------------------------------------------------------------------------------------
# Results: what the engine answered, and the report


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


# ---------------------------------------------------------------------------------------
# Sources


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
                f"PostgreSQL unreachable at {self.shown_dsn}: {_one_line(exc)}"
            ) from None
        try:
            # Both passes read one snapshot; read-only, so the query cannot write.
            await self._conn.transaction(isolation="repeatable_read", readonly=True).start()
            self._statement = await self._conn.prepare(self.query)
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self._conn.close()
            raise ImportFailed(f"the query failed: {_one_line(exc)}") from None
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
            raise ImportFailed(f"the query failed at row {number + 1}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


# ---------------------------------------------------------------------------------------
# Kafka: producing, and matching the results to this run's records


async def _started(client: Any) -> None:
    """Start an aiokafka client; one that fails to start is closed, not leaked."""
    try:
        await client.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.stop()
        raise


class _Pending:
    __slots__ = ("early", "row", "source")

    def __init__(self, row: Row) -> None:
        self.row = row
        self.source: bytes | None = None
        self.early: list[tuple[bytes | None, bytes]] = []


class _Head(msgspec.Struct):
    command_id: str


_head = msgspec.json.Decoder(_Head)


class Matcher:
    """This run's produced rows, waiting for their results. A result counts only when
    its `tally-source` header names the record this run produced: the result of an
    earlier run of the same import, still on its way, is not taken for this run's.
    Until Kafka's acknowledgement says which record a row became, results with its id
    are kept aside, since a result may be read before the acknowledgement is seen.
    Ids are unique within a run: a pair on two rows is never produced."""

    def __init__(self) -> None:
        self.pending: dict[str, _Pending] = {}
        self.outcomes = Outcomes()

    def __len__(self) -> int:
        return len(self.pending)

    def expect(self, row: Row) -> None:
        """Before producing the row."""
        self.pending[row.command_id] = _Pending(row)

    def acknowledged(self, row: Row, partition: int, offset: int) -> None:
        pending = self.pending.get(row.command_id)
        if pending is None:
            return
        pending.source = source(partition, offset)
        early, pending.early = pending.early, []
        for found, value in early:
            self._offer(pending, found, value)

    def failed(self, row: Row) -> None:
        """Kafka did not take the row: no result will come for it from this run."""
        self.pending.pop(row.command_id, None)

    def offer(self, value: bytes, source: bytes | None) -> None:
        """A record of the events topic, with its source header."""
        if not self.pending:
            return
        try:
            head = _head.decode(value)
        except msgspec.MsgspecError:
            return
        pending = self.pending.get(head.command_id)
        if pending is not None:
            self._offer(pending, source, value)

    def _offer(self, pending: _Pending, source: bytes | None, value: bytes) -> None:
        if pending.source is None:
            pending.early.append((source, value))
        elif source == pending.source:
            try:
                result = decode_result(value)
            except msgspec.MsgspecError:
                return
            del self.pending[pending.row.command_id]
            self.outcomes.add(pending.row, outcome_of(result))


class Sender(Protocol):
    """What `run` produces with: `Publisher`, or a stand-in in the unit tests."""

    produced: int
    failed: int
    outcomes: Outcomes

    @property
    def in_flight(self) -> int: ...

    async def connect(self) -> None: ...

    async def open(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, row: Row, *, stall_s: float) -> bool: ...

    async def finish(self, *, stall_s: float, progress: Progress | None = None) -> bool: ...


class Publisher:
    """Produces the deposits (acks=all, idempotent, each on its account's shard) and,
    when waiting, reads the events topic from its end as of before the first record,
    into a `Matcher`."""

    def __init__(self, settings: Settings, *, wait: bool, window: int = in_flight_max) -> None:
        self.bootstrap = settings.kafka_bootstrap
        self.partitions = settings.partitions
        self.topics: Topics = deployment_topics(settings)
        self.wait = wait
        self.window = window
        self.matcher = Matcher()
        self.outcomes = self.matcher.outcomes
        self.produced = 0
        self.acked = 0
        self.failed = 0
        self._changed = asyncio.Event()
        self._last_change = time.monotonic()
        self._producer: Any = None
        self._consumer: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Reach Kafka: before the source is read, so that an unreachable one fails fast."""
        async with self._kafka():
            producer = durable_producer(
                self.bootstrap,
                linger_ms=5,
                max_batch_size=512 * 1024,
            )
            await _started(producer)
            self._producer = producer

    async def open(self) -> None:
        """The deployment's topics and the results reader, just before producing."""
        async with self._kafka():
            # The engine may never have run on this prefix: producing to a missing
            # topic would let the broker create it with its default partition count.
            await ensure_topics(self.bootstrap, self.topics.all())
            if self.wait:
                await self._start_reader()

    @contextlib.asynccontextmanager
    async def _kafka(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(connect_timeout_s):
                yield
        except TopicMismatch as exc:
            raise ImportFailed(str(exc)) from None
        except TimeoutError:  # before OSError, of which it is one
            raise ImportFailed(
                f"Kafka unreachable at {self.bootstrap}: no answer in {connect_timeout_s:.0f}s"
            ) from None
        except (KafkaError, OSError) as exc:
            raise ImportFailed(f"Kafka unreachable at {self.bootstrap}: {_one_line(exc)}") from None

    async def _start_reader(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await _started(consumer)
        self._consumer = consumer
        tps = [TopicPartition(self.topics.events.name, p) for p in range(self.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the lazy seek now, before anything is produced
            await consumer.position(tp)
        self._reader = asyncio.create_task(self._read(), name="import-results")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    @property
    def in_flight(self) -> int:
        """Produced and not answered yet (not waiting: not acknowledged yet)."""
        return len(self.matcher) if self.wait else self.produced - self.acked - self.failed

    async def send(self, row: Row, *, stall_s: float) -> bool:
        """Produce one row once the window has room; False if it stayed full `stall_s`."""
        if not await self._until(lambda: self.in_flight < self.window, stall_s):
            return False
        if self.wait:
            self.matcher.expect(row)
        try:
            future = await self._producer.send(
                self.topics.commands.name,
                key=row.account.encode(),
                value=encode(row.command()),
                partition=shard_of(row.account, self.partitions),
            )
        except KafkaError as exc:
            raise ImportFailed(
                f"Kafka failed after {self.produced:,} deposits were produced: "
                f"{_one_line(exc)} (re-running the import is safe)"
            ) from None
        self.produced += 1
        future.add_done_callback(lambda f: self._acknowledged(row, f))
        return True

    async def finish(self, *, stall_s: float, progress: Progress | None = None) -> bool:
        """Wait for every acknowledgement, then (when waiting) every result; False if
        `stall_s` passed without one."""
        # Failed sends are counted by their callbacks.
        with contextlib.suppress(KafkaError, TimeoutError):
            await asyncio.wait_for(self._producer.flush(), flush_timeout_s)
        await asyncio.sleep(0)  # the acknowledgements' callbacks

        def done() -> bool:
            if progress is not None:
                progress.add(self.outcomes.answered - progress.done)
            return self.in_flight == 0

        return await self._until(done, stall_s)

    async def _until(self, ready: Callable[[], bool], stall_s: float) -> bool:
        """Wait until `ready()`, as long as something (an acknowledgement, a result)
        happens at least every `stall_s` seconds."""
        self._last_change = time.monotonic()
        while not ready():
            if self._reader is not None and self._reader.done():
                self._reader.result()  # a reader that died says why, not "no result came"
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(stall_s, 1.0))
            except TimeoutError:
                if time.monotonic() - self._last_change >= stall_s:
                    return ready()
        return True

    def _touch(self) -> None:
        self._last_change = time.monotonic()
        self._changed.set()

    def _acknowledged(self, row: Row, future: asyncio.Future[Any]) -> None:
        self._touch()
        if future.cancelled() or future.exception() is not None:
            self.failed += 1
            self.matcher.failed(row)
            return
        self.acked += 1
        meta = future.result()
        self.matcher.acknowledged(row, meta.partition, meta.offset)

    async def _read(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(
                    timeout_ms=poll_timeout_ms, max_records=self.window
                )
            except KafkaError:
                # The consumer reconnects by itself; a long outage ends as a stall.
                log.warning("reading results failed; retrying", exc_info=True)
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                for record in records:
                    self.matcher.offer(record.value or b"", source_in(record.headers))
            if batches:
                self._touch()


# ---------------------------------------------------------------------------------------
# The import


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
