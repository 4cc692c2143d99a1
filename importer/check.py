"""The first pass, pure: each row's values checked in a fixed order, and the pass over
all rows that counts them, finds the (account, asset) pairs on several rows and
fingerprints what it read."""

from __future__ import annotations

import decimal
import hashlib
import re
from collections.abc import (
    Mapping,
    Sequence,
)
from dataclasses import dataclass

from importer.rows import COLUMNS, FATAL, BadRow, Problem, Row, Verdict, listed_max, rows_max
from topics import limits

# Amounts as text: an optional sign and digits, nothing else ("1_000", " 5" and "0x10"
# are refused although Python's int() takes them). Decimal points and exponents are
# named apart, because a float in a balance file usually means major units.
_INTEGER_RE = re.compile(r"([+-]?)([0-9]+)")
_DECIMAL_RE = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))([eE][+-]?[0-9]+)?")
_ACCOUNT_RE = re.compile(limits.ACCOUNT_ID_PATTERN)
_ASSET_RE = re.compile(limits.ASSET_PATTERN)
_AMOUNT_DIGITS_MAX = len(str(limits.AMOUNT_MAX))


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
