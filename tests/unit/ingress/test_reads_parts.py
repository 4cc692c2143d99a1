"""The read API's pure parts (issue 16): query parameters, times, and the encoding that
keeps a command's fingerprint when it carries no reference or metadata."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingress.problems import Problem
from ingress.reads import parse_asset, parse_limit, parse_reference, parse_seq, parse_time
from streams.ledger import fingerprint
from topics import limits
from topics.codec import decode_command, decode_result, encode
from topics.schema import Deposit, Hold, Result, Status

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("0", 0),
        ("1764630000123", 1764630000123),
        (str(limits.TIME_MS_MAX), limits.TIME_MS_MAX),
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T00:00:00.0019z", 1),
        ("2026-12-01T23:00:00.123456789+01:00", 1796162400123),
        ("2026-12-01 23:00:00-00:30", 1796167800000),
        ("9999-12-31T23:59:59.999Z", limits.TIME_MS_MAX),
    ],
)
def test_times_parse_to_epoch_ms(text: str, ms: int) -> None:
    assert parse_time(text) == ms


@pytest.mark.parametrize(
    "text",
    [
        "", "yesterday", "-1", "+5", "1e3", "١٢", "²", str(limits.TIME_MS_MAX + 1), "9" * 40,
        "2026-12-01T23:00:00", "2026-12-01", "2026-13-01T00:00:00Z", "2026-12-01T24:00:00Z",
        "2026-12-01T23:00:60Z", "2026-12-01T23:00Z", "1969-12-31T23:59:59.999Z",
        "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "2026-12-01T23:00:00Z\n",
        "2026-12-01T23:00:00.Z", "2026-12-01T23:00:00+0100",
    ],
)  # fmt: skip
def test_bad_times_are_400_naming_at(text: str) -> None:
    with pytest.raises(Problem) as caught:
        parse_time(text)
    assert caught.value.status == 400 and caught.value.body()["field"] == "at"


@given(st.integers(min_value=0, max_value=limits.TIME_MS_MAX))
def test_an_rfc3339_time_and_its_epoch_ms_agree(ms: int) -> None:
    when = _EPOCH + timedelta(milliseconds=ms)
    assert parse_time(when.isoformat(timespec="milliseconds")) == ms
    assert parse_time(str(ms)) == ms


@given(st.text(max_size=30))
def test_any_text_is_a_time_or_a_400(text: str) -> None:
    try:
        ms = parse_time(text)
    except Problem as problem:
        assert problem.status == 400
    else:
        assert limits.TIME_MS_MIN <= ms <= limits.TIME_MS_MAX


@pytest.mark.parametrize(
    "text", ["", "-1", "x", "1.5", " 1", "1 ", "٣", str(limits.SEQ_MAX + 1), "0" * 20]
)
def test_bad_cursors_are_400_naming_the_field(text: str) -> None:
    with pytest.raises(Problem) as caught:
        parse_seq(text, "after_seq")
    assert caught.value.body()["field"] == "after_seq"


def test_cursors_limits_assets_and_references() -> None:
    assert parse_seq(None, "after_seq") is None
    assert parse_seq("0", "after_seq") == 0
    assert parse_seq(str(limits.SEQ_MAX), "seq") == limits.SEQ_MAX
    with pytest.raises(Problem):
        parse_seq("0", "before_seq", least=1)
    assert parse_limit(None) == 100 and parse_limit("1000") == 1000
    for bad in ("0", "1001", "-1", "x"):
        with pytest.raises(Problem) as caught:
            parse_limit(bad)
        assert caught.value.body()["field"] == "limit"
    assert parse_asset("USD", required=True) == "USD"
    assert parse_asset(None, required=False) is None
    for bad_asset in (None, "usd", "X" * 13):
        with pytest.raises(Problem) as caught:
            parse_asset(bad_asset, required=True)
        assert caught.value.body()["field"] == "asset"
    assert parse_reference("order-1") == "order-1"
    for bad_ref in (None, "", "a/b", "x" * 129, "a\n"):
        with pytest.raises(Problem) as caught:
            parse_reference(bad_ref)
        assert caught.value.body()["field"] == "reference"


def test_a_command_without_reference_or_metadata_encodes_as_before() -> None:
    # The bytes these encoded to before the fields existed: fingerprints remembered by
    # a running engine must still match a retry after the upgrade.
    deposit = Deposit(account="a", command_id="c", asset="USD", amount=5)
    assert encode(deposit) == (
        b'{"kind":"deposit","command_id":"c","asset":"USD","amount":5,"v":1,"account":"a"}'
    )
    hold = Hold(account="a", command_id="c", hold_id="h", asset="USD", amount=5)
    assert encode(hold).endswith(b'"expires_at_ms":null,"v":1,"account":"a"}')
    result = Result(command_id="c", account="a", kind="deposit", status=Status.APPLIED, at_ms=5)
    assert encode(result).endswith(b'"emitted":0,"at_ms":5}')


def test_reference_and_metadata_are_part_of_the_fingerprint() -> None:
    plain = Deposit(account="a", command_id="c", asset="USD", amount=5)
    tagged = Deposit(account="a", command_id="c", asset="USD", amount=5, reference="r")
    meta = Deposit(account="a", command_id="c", asset="USD", amount=5, metadata={"k": "v"})
    other = Deposit(account="a", command_id="c", asset="USD", amount=5, metadata={"k": "w"})
    assert len({fingerprint(c) for c in (plain, tagged, meta, other)}) == 4
    both = Deposit(account="a", command_id="c", asset="USD", amount=5, reference="r",
                   metadata={"k": "v", "a": "\"}"})  # fmt: skip
    assert decode_command(encode(both)) == both
    assert decode_command(encode(tagged)) == tagged


def test_a_metadata_value_that_looks_like_the_fields_is_kept() -> None:
    tricky = ',"metadata":null}'
    command = Deposit(account="a", command_id="c", asset="USD", amount=5, metadata={"k": tricky})
    assert decode_command(encode(command)) == command
    result = Result(command_id="c", account="a", kind="deposit", status=Status.APPLIED,
                    at_ms=5, metadata={"k": tricky}, reference="r")  # fmt: skip
    assert decode_result(encode(result)) == result
