"""`tally import`'s pure parts: the command-id scheme, the row checks with their line
numbers, the duplicate-pair rule, strict against lenient, and the matching of results
to the records this run produced."""

from __future__ import annotations

import asyncio
import io
import re
from decimal import Decimal
from pathlib import Path

import pytest

from core.progress import Progress
from core.settings import Settings
from importer import run as importer
from importer.check import Checker, check_header, check_values
from importer.publish import Matcher
from importer.report import Outcomes, outcome_of
from importer.rows import (
    BadRow,
    Problem,
    Row,
    Verdict,
    command_id,
    line_bytes_max,
    listed_max,
    rows_max,
)
from importer.run import Options, Report
from importer.sources import csv_verdicts, decoded_lines
from topics import limits
from topics.codec import decode_command, encode
from topics.schema import Deposit, FirstResult, Reason, Result, Status

HEADER = "account,asset,amount\n"


def verdicts(text: str) -> list[Verdict]:
    return list(csv_verdicts(io.StringIO(text, newline="")))


def checked(text: str, *, rows_limit: int = rows_max, listed_limit: int = listed_max) -> Checker:
    checker = Checker(rows_limit=rows_limit, listed_limit=listed_limit)
    for verdict in verdicts(text):
        checker.feed(verdict)
        if checker.fatal is not None:
            break
    return checker


# Ids ----------------------------------------------------------------------------------


def test_the_id_is_open_account_asset_and_the_longest_fits_the_id_pattern() -> None:
    assert command_id("alice", "USD") == "open:alice:USD"
    longest = command_id("a" * limits.ACCOUNT_ID_LEN_MAX, "A" * limits.ASSET_LEN_MAX)
    assert len(longest) == 82 <= limits.COMMAND_ID_LEN_MAX
    assert re.match(limits.COMMAND_ID_PATTERN, longest)
    deposit = Row(2, "a" * 64, "A" * 12, limits.AMOUNT_MAX).command()
    assert decode_command(encode(deposit)) == deposit  # the engine takes it as it is


def test_ids_do_not_depend_on_the_amount_and_never_collide_across_pairs() -> None:
    assert Row(2, "a", "USD", 5).command_id == Row(9, "a", "USD", 7).command_id
    # ':' is allowed in account ids, never in assets: the last ':' splits the id.
    pairs = [("a:b", "C"), ("a", "BC"), ("a:b:C", "D"), ("a", "B")]
    ids = {command_id(account, asset) for account, asset in pairs}
    assert len(ids) == len(pairs)


def test_a_good_row_is_a_deposit_of_its_amount() -> None:
    assert Row(2, "alice", "USD", 1500).command() == Deposit(
        command_id="open:alice:USD", account="alice", asset="USD", amount=1500
    )


# Parsing ------------------------------------------------------------------------------


def test_good_rows_carry_their_line_numbers_and_blank_lines_are_skipped() -> None:
    text = (
        HEADER
        + "alice,USD,100\n\nbob,EUR,2\r\n"
        + '"carol",BTC,"170141183460469231731687303715884105727"\n'
    )
    assert verdicts(text) == [
        Row(2, "alice", "USD", 100),
        Row(4, "bob", "EUR", 2),
        Row(5, "carol", "BTC", limits.AMOUNT_MAX),
    ]


def test_the_columns_may_come_in_any_order() -> None:
    assert verdicts("amount,account,asset\n7,alice,USD\n") == [Row(2, "alice", "USD", 7)]


def test_a_utf8_bom_is_dropped_and_a_byte_that_is_not_utf8_names_its_line() -> None:
    raw = b"\xef\xbb\xbf" + HEADER.encode() + b"alice,USD,1\nb\xffb,USD,2\nc,USD,3\n"
    got = list(csv_verdicts(decoded_lines(io.BytesIO(raw))))
    assert got[0] == Row(2, "alice", "USD", 1)
    assert got[1][:2] == (3, Problem.MALFORMED_CSV) and len(got) == 2


def test_an_overlong_line_stops_the_import_at_that_line() -> None:
    raw = (HEADER + "alice,USD,1\n" + "x" * (line_bytes_max + 1) + "\n").encode()
    got = list(csv_verdicts(decoded_lines(io.BytesIO(raw))))
    assert got[-1][:2] == (3, Problem.MALFORMED_CSV)


# A data row of each kind of bad input, and the problem it must report.
BAD_ROWS = [
    ("alice,USD", Problem.MISSING_FIELD),
    ("alice", Problem.MISSING_FIELD),
    (",USD,5", Problem.MISSING_FIELD),
    ("alice,,5", Problem.MISSING_FIELD),
    ("alice,USD,", Problem.MISSING_FIELD),
    ("alice,USD,5,6", Problem.EXTRA_FIELD),
    ("has space,USD,5", Problem.BAD_ACCOUNT),
    (" alice,USD,5", Problem.BAD_ACCOUNT),
    ("a/b,USD,5", Problem.BAD_ACCOUNT),
    ("a" * 65 + ",USD,5", Problem.BAD_ACCOUNT),
    ("alice,usd,5", Problem.BAD_ASSET),
    ("alice,US-D,5", Problem.BAD_ASSET),
    ("alice,ABCDEFGHIJKLM,5", Problem.BAD_ASSET),
    ("alice,USD,abc", Problem.AMOUNT_NOT_A_NUMBER),
    ("alice,USD,1_000", Problem.AMOUNT_NOT_A_NUMBER),
    ("alice,USD,0x10", Problem.AMOUNT_NOT_A_NUMBER),
    ("alice,USD, 5", Problem.AMOUNT_NOT_A_NUMBER),
    ("alice,USD,5 ", Problem.AMOUNT_NOT_A_NUMBER),
    ("alice,USD,inf", Problem.AMOUNT_NOT_A_NUMBER),
    ('alice,USD,"1,000"', Problem.AMOUNT_NOT_A_NUMBER),
    ("alice,USD,1.5", Problem.AMOUNT_FRACTIONAL),
    ("alice,USD,100.0", Problem.AMOUNT_FRACTIONAL),
    ("alice,USD,.5", Problem.AMOUNT_FRACTIONAL),
    ("alice,USD,1e3", Problem.AMOUNT_FRACTIONAL),
    ("alice,USD,-2.5E-3", Problem.AMOUNT_FRACTIONAL),
    ("alice,USD,0", Problem.AMOUNT_NOT_POSITIVE),
    ("alice,USD,000", Problem.AMOUNT_NOT_POSITIVE),
    ("alice,USD,-0", Problem.AMOUNT_NOT_POSITIVE),
    ("alice,USD,-5", Problem.AMOUNT_NOT_POSITIVE),
    ("alice,USD,170141183460469231731687303715884105728", Problem.AMOUNT_TOO_LARGE),
    ("alice,USD," + "9" * 5000, Problem.AMOUNT_TOO_LARGE),
]


@pytest.mark.parametrize(("line", "problem"), BAD_ROWS)
def test_each_bad_row_names_its_line_and_problem(line: str, problem: Problem) -> None:
    text = HEADER + "ok,USD,1\n" + line + "\nok,EUR,1\n"
    got = verdicts(text)
    assert got[0] == Row(2, "ok", "USD", 1) and got[2] == Row(4, "ok", "EUR", 1)
    assert isinstance(got[1], BadRow) and got[1][:2] == (3, problem), got[1]
    assert got[1].detail


@pytest.mark.parametrize(
    "amount", ["1", "0007", "+5", "9223372036854775807", "170141183460469231731687303715884105727"]
)
def test_amounts_that_are_whole_minor_units_pass(amount: str) -> None:
    (row,) = verdicts(HEADER + f"alice,USD,{amount}\n")
    assert isinstance(row, Row) and row.amount == int(amount)


@pytest.mark.parametrize(
    "header",
    ["", "account,asset\n", "account,asset,amount,note\n", "account;asset;amount\n",
     "Account,Asset,Amount\n", "account,account,amount\n", "alice,USD,100\n"],
)  # fmt: skip
def test_a_wrong_header_is_line_1_and_ends_the_file(header: str) -> None:
    got = verdicts(header + "alice,USD,100\n")
    assert len(got) == 1 and got[0][:2] == (1, Problem.BAD_HEADER)


def test_malformed_csv_names_the_line_it_starts_on() -> None:
    got = verdicts(HEADER + 'alice,USD,1\nbob,"EUR,2\n')
    assert got[0] == Row(2, "alice", "USD", 1)
    assert got[1][:2] == (3, Problem.MALFORMED_CSV)


def test_a_quoted_newline_keeps_the_next_rows_on_their_own_lines() -> None:
    got = verdicts(HEADER + '"al\nice",USD,1\nbob,EUR,2\n')
    assert got[0][:2] == (2, Problem.BAD_ACCOUNT)
    assert got[1] == Row(4, "bob", "EUR", 2)


# Typed values, as a PostgreSQL query returns them ----------------------------------


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        (5, 5),
        (Decimal("12"), 12),
        (Decimal("1.2E+3"), 1200),
        (Decimal("100.00"), Problem.AMOUNT_FRACTIONAL),  # numeric(12,2): major units
        (Decimal("0.5"), Problem.AMOUNT_FRACTIONAL),
        (Decimal("NaN"), Problem.AMOUNT_NOT_A_NUMBER),
        (100.0, Problem.AMOUNT_FRACTIONAL),
        (True, Problem.AMOUNT_NOT_A_NUMBER),
        (b"5", Problem.AMOUNT_NOT_A_NUMBER),
        ("5", 5),
        (0, Problem.AMOUNT_NOT_POSITIVE),
        (-1, Problem.AMOUNT_NOT_POSITIVE),
        (2**127, Problem.AMOUNT_TOO_LARGE),
        (None, Problem.MISSING_FIELD),
    ],
)
def test_typed_amounts(amount: object, expected: int | Problem) -> None:
    got = check_values(7, {"account": "alice", "asset": "USD", "amount": amount})
    if isinstance(expected, int):
        assert got == Row(7, "alice", "USD", expected)
    else:
        assert isinstance(got, BadRow) and got[:2] == (7, expected)


def test_typed_accounts_and_assets_must_be_text() -> None:
    got = check_values(3, {"account": 42, "asset": "USD", "amount": 1})
    assert got[:2] == (3, Problem.BAD_ACCOUNT)
    got = check_values(3, {"account": "a", "asset": 1, "amount": 1})
    assert got[:2] == (3, Problem.BAD_ASSET)


def test_query_columns_are_checked_like_a_header() -> None:
    assert check_header(["asset", "amount", "account"]) == ["asset", "amount", "account"]
    bad = check_header(["account", "asset"])
    assert isinstance(bad, BadRow) and bad.problem is Problem.BAD_HEADER


# The first pass ----------------------------------------------------------------------


def test_every_row_of_a_duplicated_pair_is_bad_with_the_other_lines_named() -> None:
    text = HEADER + "a,USD,1\nb,USD,2\na,USD,1\nc,USD,3\na,USD,9\na,EUR,1\n"
    checker = checked(text)
    assert (checker.rows, checker.good, checker.bad) == (6, 3, 3)
    assert sorted(checker.bad_rows) == [
        BadRow(2, Problem.DUPLICATE_ROW, "(a, USD) is also on line 4"),
        BadRow(4, Problem.DUPLICATE_ROW, "(a, USD) is also on line 2"),
        BadRow(6, Problem.DUPLICATE_ROW, "(a, USD) is also on line 2"),
    ]
    admitted = [checker.admitted(v) for v in verdicts(text)]
    assert [r.line for r in admitted if r is not None] == [3, 5, 7]


def test_a_file_of_mixed_rows_reports_each_bad_line() -> None:
    text = (
        HEADER
        + "alice,USD,100\n"  # 2
        + "bob,EUR,1.5\n"  # 3
        + "\n"  # 4: blank, skipped
        + "carol,usd,5\n"  # 5
        + "dave,USD,-3\n"  # 6
        + "erin,BTC\n"  # 7
        + "alice,USD,100\n"  # 8
        + "frank,BTC,12\n"  # 9
    )
    checker = checked(text)
    got = [(b.line, b.problem) for b in sorted(checker.bad_rows)]
    assert got == [
        (2, Problem.DUPLICATE_ROW),
        (3, Problem.AMOUNT_FRACTIONAL),
        (5, Problem.BAD_ASSET),
        (6, Problem.AMOUNT_NOT_POSITIVE),
        (7, Problem.MISSING_FIELD),
        (8, Problem.DUPLICATE_ROW),
    ]
    assert (checker.rows, checker.good, checker.bad) == (7, 1, 6)


def test_too_many_rows_is_fatal_and_only_so_many_bad_rows_are_listed() -> None:
    checker = checked(HEADER + "a,USD,1\n" * 3, rows_limit=2)
    assert checker.fatal is not None and checker.fatal[:2] == (4, Problem.TOO_MANY_ROWS)
    checker = checked(HEADER + "a,USD,0\n" * 30, listed_limit=10)
    assert checker.bad == 30 and len(checker.bad_rows) == 10


# Strict, lenient and the report ---------------------------------------------------


class FakeSender:
    """Stands in for Kafka and the engine: every row sent is answered with `answer`."""

    def __init__(self, answer: Result | None = None) -> None:
        self.answer = answer
        self.sent: list[Row] = []
        self.outcomes = Outcomes()
        self.produced = 0
        self.failed = 0
        self.opened = False

    @property
    def in_flight(self) -> int:
        return 0 if self.answer else self.produced

    async def connect(self) -> None:
        pass

    async def open(self) -> None:
        self.opened = True

    async def stop(self) -> None:
        pass

    async def send(self, row: Row, *, stall_s: float) -> bool:
        self.sent.append(row)
        self.produced += 1
        if self.answer is not None:
            self.outcomes.add(row, outcome_of(self.answer))
        return True

    async def finish(self, *, stall_s: float, progress: Progress | None = None) -> bool:
        return self.in_flight == 0


def result(status: Status, reason: Reason | None = None, first: Status | None = None) -> Result:
    """A result; with `first`, a duplicate's first outcome, which carries the reason."""
    return Result(
        command_id="x",
        account="a",
        kind="deposit",
        status=status,
        reason=None if first else reason,
        first=None if first is None else FirstResult(status=first, reason=reason, at_ms=1),
        at_ms=1,
    )


MIXED = HEADER + "alice,USD,100\nbob,EUR,1.5\nbob,USD,7\nbob,USD,8\ncarol,BTC,3\n"


async def run(
    tmp_path: Path, text: str, sender: FakeSender, *, strict: bool = False, dry_run: bool = False
) -> Report:
    path = tmp_path / "balances.csv"
    path.write_text(text)
    return await importer.run(
        Settings(topic_prefix="unit"),
        importer.CsvSource(path),
        Options(strict=strict, dry_run=dry_run),
        say=lambda _: None,
        sender=sender,
    )


async def test_lenient_produces_the_good_rows_only(tmp_path: Path) -> None:
    sender = FakeSender(result(Status.APPLIED))
    report = await run(tmp_path, MIXED, sender)
    assert [(r.line, r.command_id) for r in sender.sent] == [
        (2, "open:alice:USD"),
        (6, "open:carol:BTC"),
    ]
    assert (report.rows, report.good, report.bad, report.produced) == (5, 2, 3, 2)
    assert report.outcomes.counts == {"applied": 2}
    assert report.exit_code() == 1  # bad rows: not every row is in the ledger
    text = importer.render(report)
    assert "line 3: amount_fractional" in text and "line 5: duplicate_row" in text
    assert "lines: 5 read, 2 good, 3 bad" in text and "INCOMPLETE" in text


async def test_strict_produces_nothing_when_a_row_is_bad(tmp_path: Path) -> None:
    sender = FakeSender(result(Status.APPLIED))
    report = await run(tmp_path, MIXED, sender, strict=True)
    assert sender.sent == [] and not sender.opened and report.blocked
    assert report.exit_code() == 1
    assert "--strict: nothing was produced" in importer.render(report)


async def test_strict_with_only_good_rows_imports_them_all(tmp_path: Path) -> None:
    sender = FakeSender(result(Status.APPLIED))
    report = await run(tmp_path, HEADER + "a,USD,1\nb,USD,2\n", sender, strict=True)
    assert len(sender.sent) == 2 and report.exit_code() == 0
    assert importer.render(report).endswith("complete: every row is in the ledger")


async def test_a_bad_header_produces_nothing_even_when_lenient(tmp_path: Path) -> None:
    sender = FakeSender(result(Status.APPLIED))
    report = await run(tmp_path, "acct,asset,amount\na,USD,1\n", sender)
    assert sender.sent == [] and report.fatal is not None and report.exit_code() == 1
    assert "line 1: bad_header" in importer.render(report)


async def test_a_dry_run_only_checks(tmp_path: Path) -> None:
    sender = FakeSender(result(Status.APPLIED))
    report = await run(tmp_path, HEADER + "a,USD,1\n", sender, dry_run=True)
    assert sender.sent == [] and report.exit_code() == 0


async def test_rows_left_unanswered_fail_the_import(tmp_path: Path) -> None:
    report = await run(tmp_path, HEADER + "a,USD,1\n", FakeSender(answer=None))
    assert report.unanswered == 1 and report.exit_code() == 1
    assert report.stalled_s == 60.0 and "not answered: 1" in importer.render(report)


async def test_a_missing_file_fails_naming_it(tmp_path: Path) -> None:
    with pytest.raises(importer.ImportFailed, match=r"cannot read .*nope\.csv"):
        await importer.run(
            Settings(),
            importer.CsvSource(tmp_path / "nope.csv"),
            Options(),
            say=lambda _: None,
            sender=FakeSender(),
        )


@pytest.mark.parametrize(
    ("answer", "outcome", "imported"),
    [
        (result(Status.APPLIED), "applied", True),
        (result(Status.DUPLICATE, first=Status.APPLIED), "already imported", True),
        (result(Status.REJECTED, Reason.COMMAND_ID_REUSED), "rejected: command_id_reused", False),
        (result(Status.REJECTED, Reason.ACCOUNT_CLOSED), "rejected: account_closed", False),
        (
            result(Status.DUPLICATE, Reason.ACCOUNT_CLOSED, first=Status.REJECTED),
            "previously rejected: account_closed",
            False,
        ),
    ],
)
async def test_outcomes(tmp_path: Path, answer: Result, outcome: str, imported: bool) -> None:
    report = await run(tmp_path, HEADER + "a,USD,1\n", FakeSender(answer))
    assert report.outcomes.counts == {outcome: 1}
    assert report.exit_code() == (0 if imported else 1)
    if not imported:
        assert f"line 2 (a, USD, 1): {outcome}" in importer.render(report)


# Matching results to this run's records -------------------------------------------


def event(row: Row, status: Status = Status.APPLIED) -> bytes:
    return encode(
        Result(command_id=row.command_id, account=row.account, kind="deposit", status=status,
               at_ms=1)
    )  # fmt: skip


def test_only_the_result_of_this_runs_record_counts() -> None:
    matcher = Matcher()
    row = Row(2, "alice", "USD", 5)
    matcher.expect(row)
    matcher.acknowledged(row, 3, 40)
    matcher.offer(event(row), b"3:12")  # an earlier run's record of the same id
    matcher.offer(b"not json", b"3:40")
    assert len(matcher) == 1 and matcher.outcomes.answered == 0
    matcher.offer(event(row, Status.DUPLICATE), b"3:40")
    assert len(matcher) == 0 and matcher.outcomes.counts == {"already imported": 1}


def test_a_result_read_before_the_acknowledgement_is_kept_for_it() -> None:
    matcher = Matcher()
    row = Row(2, "alice", "USD", 5)
    matcher.expect(row)
    matcher.offer(event(row), b"1:7")
    matcher.offer(event(row), b"1:8")
    assert len(matcher) == 1
    matcher.acknowledged(row, 1, 8)
    assert len(matcher) == 0 and matcher.outcomes.counts == {"applied": 1}


def test_a_row_kafka_did_not_take_waits_for_nothing() -> None:
    matcher = Matcher()
    row = Row(2, "alice", "USD", 5)
    matcher.expect(row)
    matcher.failed(row)
    assert len(matcher) == 0


async def test_a_result_reader_that_died_is_reported_not_taken_for_a_stall() -> None:
    from core.settings import load
    from importer.run import Publisher

    publisher = Publisher(load({}), wait=True)

    async def broken() -> None:
        raise RuntimeError("reader broke")

    publisher._reader = asyncio.create_task(broken())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="reader broke"):
        await publisher._until(lambda: False, stall_s=30)
