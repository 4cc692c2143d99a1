"""The rows of an import and its limits: what a good row (one deposit) and a bad one are,
why a row is refused, the deposit's command id, and the error that stops an import."""

from __future__ import annotations

import enum
from typing import NamedTuple

from core.errors import CANNOT_RUN, TallyError
from topics.schema import Deposit

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


class ImportFailed(TallyError):
    """The import could not run: a source or service unreachable, a query that fails.
    The message is one line naming what failed."""

    exit_code = CANNOT_RUN


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


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
