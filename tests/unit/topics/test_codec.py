"""The wire codec: what `decode_command` accepts, what it answers as Invalid, and what it
sends to the dead-letter topic as Undecodable. It must never raise."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topics import limits
from topics.codec import (
    Invalid,
    Undecodable,
    dead_letter,
    decode_command,
    decode_dead_letter,
    decode_result,
    encode,
)
from topics.schema import (
    Capture,
    Command,
    Configure,
    Credit,
    DeadLetter,
    Deposit,
    Disburse,
    Entry,
    Expire,
    FirstResult,
    Hold,
    Leg,
    Reason,
    Refund,
    Release,
    Result,
    Status,
    Transfer,
    Withdraw,
)

PUBLIC_EXAMPLES: list[Command] = [
    Deposit(command_id="d-1", account="alice", asset="USD", amount=1),
    Withdraw(command_id="w.1", account="alice", asset="BTC", amount=limits.AMOUNT_MAX),
    Transfer(command_id="t:1", account="a_b", to="c-d", asset="USD", amount=42),
    Disburse(
        command_id="x1",
        account="alice",
        asset="EUR",
        legs=[Leg(to="bob", amount=1), Leg(to="carol", amount=2)],
    ),
    Hold(command_id="h1", account="alice", hold_id="hold-1", asset="USD", amount=5),
    Hold(
        command_id="h2",
        account="alice",
        hold_id="hold-2",
        asset="USD",
        amount=5,
        expires_at_ms=1_700_000_000_000,
    ),
    Release(command_id="r1", account="alice", hold_id="hold-1"),
    Capture(command_id="c1", account="alice", hold_id="hold-1"),
    Capture(command_id="c2", account="alice", hold_id="hold-1", amount=3, to="bob"),
    Configure(command_id="k1", account="alice", status="frozen"),
    Configure(command_id="k2", account="alice", asset="USD", overdraft_limit=0),
    Configure(command_id="k3", account="alice", status="closed", asset="USD", overdraft_limit=9),
]

INTERNAL_EXAMPLES: list[Command] = [
    Credit(
        command_id="t1/credit",
        account="bob",
        asset="USD",
        amount=3,
        origin_command_id="t1",
        origin_account="alice",
    ),
    Credit(
        command_id="x1/credit/999",
        account="bob",
        asset="USD",
        amount=3,
        origin_command_id="x1",
        origin_account="alice",
    ),
    Refund(
        command_id="t1/credit/refund",
        account="alice",
        asset="USD",
        amount=3,
        origin_command_id="t1",
        reason="account_closed",
    ),
    Expire(command_id="expire.abc", account="alice", hold_id="h1"),
]

BASE = {"kind": "deposit", "command_id": "cmd-1", "account": "alice", "asset": "USD", "amount": 5}


def raw(**changes: Any) -> bytes:
    """A deposit record with some fields changed (a value of ... removes the field)."""
    obj = {**BASE, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def assert_invalid(
    got: object, reason: Reason = Reason.INVALID_COMMAND, where: str | None = None
) -> Invalid:
    assert isinstance(got, Invalid), got
    assert got.reason is reason, got
    assert len(got.detail) <= limits.DETAIL_LEN_MAX
    if where is not None:
        assert f"`{where}`" in got.detail, got.detail
    return got


@pytest.mark.parametrize("command", PUBLIC_EXAMPLES, ids=lambda c: type(c).__name__)
def test_public_commands_round_trip(command: Command) -> None:
    assert decode_command(encode(command)) == command


@pytest.mark.parametrize("command", INTERNAL_EXAMPLES, ids=lambda c: type(c).__name__)
def test_internal_commands_round_trip_on_the_internal_decoder(command: Command) -> None:
    assert decode_command(encode(command), internal=True) == command


def test_every_public_kind_has_a_round_trip_example() -> None:
    from topics.schema import INTERNAL_KINDS, PUBLIC_KINDS

    kinds = {json.loads(encode(c))["kind"] for c in PUBLIC_EXAMPLES}
    assert kinds == set(PUBLIC_KINDS)
    kinds = {json.loads(encode(c))["kind"] for c in INTERNAL_EXAMPLES}
    assert kinds == set(INTERNAL_KINDS)


def test_missing_v_defaults_to_version_1() -> None:
    got = decode_command(raw())
    assert got == Deposit(command_id="cmd-1", account="alice", asset="USD", amount=5)
    assert decode_command(raw(v=1)) == got


@pytest.mark.parametrize(
    "amount",
    [1.0, 1.5, "5", True, False, 0, -1, 2**127, 2**128, 10**40, None, [5], {"n": 5}],
    ids=repr,
)
def test_amounts_outside_1_to_2_127_minus_1_are_refused(amount: object) -> None:
    got = assert_invalid(decode_command(raw(amount=amount)), where="$.amount")
    assert got.command_id == "cmd-1"
    assert got.account == "alice"
    assert got.kind == "deposit"


@pytest.mark.parametrize("literal", [b"1e3", b"5.0", b"5e0", b"-0.0"])
def test_amount_float_literals_are_refused(literal: bytes) -> None:
    record = raw().replace(b'"amount": 5', b'"amount": ' + literal)
    assert literal in record
    assert_invalid(decode_command(record), where="$.amount")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"0x10", b"05"])
def test_amount_non_json_literals_are_undecodable(literal: bytes) -> None:
    record = raw().replace(b'"amount": 5', b'"amount": ' + literal)
    assert isinstance(decode_command(record), Undecodable)


@pytest.mark.parametrize("amount", [1, 2**53, 2**63 - 1, 2**63, 2**64, limits.AMOUNT_MAX])
def test_amounts_up_to_2_127_minus_1_are_accepted_exactly(amount: int) -> None:
    got = decode_command(raw(amount=amount))
    assert isinstance(got, Deposit) and got.amount == amount
    assert decode_command(encode(got)) == got


@pytest.mark.parametrize(
    "account",
    ["", "a" * 65, "al ice", "al|ice", "al/ice", "ålice", "alice\u200b", "{alice}", 5, None],
    ids=repr,
)
def test_bad_account_ids_are_invalid(account: object) -> None:
    got = assert_invalid(decode_command(raw(account=account)), where="$.account")
    assert got.account == ""  # unusable accounts are not echoed back


@pytest.mark.parametrize("account", ["alice\n", "alice\r\n", "\nalice"], ids=repr)
def test_account_ids_with_line_breaks_are_invalid(account: str) -> None:
    # '$' in the id patterns also matches before a trailing newline (re.search semantics).
    got = decode_command(raw(account=account))
    assert isinstance(got, Invalid), got
    assert got.account == ""


def test_account_of_64_chars_is_accepted() -> None:
    got = decode_command(raw(account="a" * 64))
    assert isinstance(got, Deposit) and got.account == "a" * 64


@pytest.mark.parametrize("asset", ["usd", "A" * 13, "", "US D", "US-D", "USD\n", 1], ids=repr)
def test_bad_assets_are_invalid(asset: object) -> None:
    got = assert_invalid(decode_command(raw(asset=asset)), where="$.asset")
    assert got.account == "alice"


def test_asset_of_12_chars_is_accepted() -> None:
    assert isinstance(decode_command(raw(asset="A" * 12)), Deposit)


def test_command_id_with_trailing_newline_is_not_accepted() -> None:
    got = decode_command(raw(command_id="cmd-1\n"))
    assert not isinstance(got, Deposit), got


def test_unknown_kind_is_invalid() -> None:
    got = assert_invalid(decode_command(raw(kind="teleport")), where="$.kind")
    assert got.kind == "teleport"
    assert got.command_id == "cmd-1"


def test_missing_kind_is_invalid() -> None:
    got = assert_invalid(decode_command(raw(kind=...)))
    assert got.kind == ""


@pytest.mark.parametrize("command", INTERNAL_EXAMPLES, ids=lambda c: type(c).__name__)
def test_internal_kinds_are_refused_by_the_public_decoder(command: Command) -> None:
    obj = json.loads(encode(command))
    obj["command_id"] = "plain-id"  # a usable client id, so the answer is Invalid
    got = assert_invalid(decode_command(json.dumps(obj).encode()), where="$.kind")
    assert got.kind == obj["kind"]
    # ... and with their own derived ids they cannot even be answered.
    assert isinstance(decode_command(encode(command)), Invalid | Undecodable)
    assert decode_command(encode(command), internal=True) == command


def test_public_kinds_are_refused_by_the_internal_decoder() -> None:
    got = decode_command(raw(), internal=True)
    assert_invalid(got, where="$.kind")


def test_internal_decoder_refuses_an_overlong_internal_id() -> None:
    credit = INTERNAL_EXAMPLES[0]
    obj = json.loads(encode(credit))
    obj["command_id"] = "a" * 221  # one past the longest derivable id (see topics.ids)
    assert isinstance(decode_command(json.dumps(obj).encode(), internal=True), Undecodable)


@pytest.mark.parametrize("version", [2, 0, "1", True, None, 1.5])
def test_other_versions_are_unsupported_version(version: object) -> None:
    got = assert_invalid(decode_command(raw(v=version)), Reason.UNSUPPORTED_VERSION)
    assert got.command_id == "cmd-1"


def test_unsupported_version_wins_over_other_errors() -> None:
    got = decode_command(raw(v=2, amount=-1, future_field=True))
    assert_invalid(got, Reason.UNSUPPORTED_VERSION)


def test_unknown_extra_field_is_invalid() -> None:
    got = assert_invalid(decode_command(raw(memo="hi")))
    assert "memo" in got.detail


def test_unknown_field_in_a_leg_is_invalid() -> None:
    record = json.dumps(
        {
            "kind": "disburse",
            "command_id": "x1",
            "account": "alice",
            "asset": "USD",
            "legs": [{"to": "bob", "amount": 1, "memo": "x"}],
        }
    ).encode()
    assert_invalid(decode_command(record))


def test_missing_required_field_is_invalid() -> None:
    assert_invalid(decode_command(raw(amount=...)))


def disburse(n_legs: int) -> bytes:
    return json.dumps(
        {
            "kind": "disburse",
            "command_id": "x1",
            "account": "alice",
            "asset": "USD",
            "legs": [{"to": f"p{i}", "amount": 1} for i in range(n_legs)],
        }
    ).encode()


def test_disburse_leg_count_bounds() -> None:
    assert_invalid(decode_command(disburse(0)), where="$.legs")
    assert_invalid(decode_command(disburse(limits.DISBURSE_LEGS_MAX + 1)), where="$.legs")
    one = decode_command(disburse(1))
    assert isinstance(one, Disburse) and len(one.legs) == 1
    most = decode_command(disburse(limits.DISBURSE_LEGS_MAX))
    assert isinstance(most, Disburse) and len(most.legs) == limits.DISBURSE_LEGS_MAX


def test_a_full_disbursement_fits_the_record_limit() -> None:
    big = Disburse(
        command_id="c" * limits.COMMAND_ID_LEN_MAX,
        account="a" * limits.ACCOUNT_ID_LEN_MAX,
        asset="A" * limits.ASSET_LEN_MAX,
        legs=[
            Leg(to="b" * limits.ACCOUNT_ID_LEN_MAX, amount=limits.AMOUNT_MAX)
            for _ in range(limits.DISBURSE_LEGS_MAX)
        ],
    )
    data = encode(big)
    assert len(data) <= limits.COMMAND_BYTES_MAX
    assert decode_command(data) == big


@pytest.mark.parametrize(
    "record",
    [
        b"",
        b"not json",
        b'{"command_id": "x"',
        b"[1, 2, 3]",
        b'"deposit"',
        b"42",
        b"null",
        b'{"kind": "deposit", "account": "alice", "asset": "USD", "amount": 5}',
        raw(command_id=None),
        raw(command_id=7),
        raw(command_id=""),
        raw(command_id="a/b"),
        raw(command_id="a b"),
        raw(command_id="a" * (limits.COMMAND_ID_LEN_MAX + 1)),
        b"\xff\xfe\x00",
    ],
    ids=repr,
)
def test_records_without_a_usable_command_id_are_undecodable(record: bytes) -> None:
    got = decode_command(record)
    assert isinstance(got, Undecodable), got
    assert got.reason


def test_command_id_of_max_length_is_accepted() -> None:
    got = decode_command(raw(command_id="a" * limits.COMMAND_ID_LEN_MAX))
    assert isinstance(got, Deposit)


def test_record_over_the_size_limit_naming_an_id_is_record_too_large() -> None:
    record = raw(command_id="ok", account="x" * (limits.COMMAND_BYTES_MAX + 1))
    assert len(record) > limits.COMMAND_BYTES_MAX
    got = decode_command(record)
    assert isinstance(got, Invalid) and got.reason is Reason.RECORD_TOO_LARGE
    assert (got.command_id, got.account, got.kind) == ("ok", "", "deposit")
    assert str(limits.COMMAND_BYTES_MAX) in got.detail


def test_an_oversize_command_is_answered_with_its_account_and_kind() -> None:
    record = raw(command_id="big", memo="m" * limits.COMMAND_BYTES_MAX)
    got = decode_command(record)
    assert isinstance(got, Invalid)
    assert (got.command_id, got.account, got.kind, got.reason) == (
        "big", "alice", "deposit", Reason.RECORD_TOO_LARGE
    )  # fmt: skip


def test_past_the_decode_cap_only_a_bounded_prefix_is_scanned_for_the_id() -> None:
    pad = "p" * limits.SALVAGE_DECODE_BYTES_MAX
    front = json.dumps({"command_id": "c-1", "account": "bob", "kind": "withdraw", "memo": pad})
    got = decode_command(front.encode())
    assert isinstance(got, Invalid) and got.reason is Reason.RECORD_TOO_LARGE
    assert (got.command_id, got.account, got.kind) == ("c-1", "bob", "withdraw")
    back = json.dumps({"memo": pad, "command_id": "c-2", "account": "bob"})
    late = decode_command(back.encode())
    assert isinstance(late, Undecodable) and "no usable command_id" in late.reason


def test_an_oversize_record_without_a_usable_id_is_undecodable() -> None:
    for record in (
        b"\xff" * (limits.COMMAND_BYTES_MAX + 1),
        raw(command_id="has space", memo="m" * limits.COMMAND_BYTES_MAX),
        b"[" * (limits.SALVAGE_DECODE_BYTES_MAX - 1) + b"]" * 5,
        json.dumps({"command_id": 5, "memo": "m" * limits.COMMAND_BYTES_MAX}).encode(),
    ):
        got = decode_command(record)
        assert isinstance(got, Undecodable)
        assert str(limits.COMMAND_BYTES_MAX) in got.reason


def test_record_at_the_size_limit_is_decoded() -> None:
    body = raw(asset="usd")  # invalid, but decoded far enough to be answered
    padded = body[:-1] + b" " * (limits.COMMAND_BYTES_MAX - len(body)) + b"}"
    assert len(padded) == limits.COMMAND_BYTES_MAX
    assert isinstance(decode_command(padded), Invalid)


def test_invalid_detail_is_bounded() -> None:
    got = assert_invalid(decode_command(raw(kind="k" * 5000)))
    assert len(got.detail) <= limits.DETAIL_LEN_MAX
    assert got.kind == ""  # an overlong kind is not echoed back


def test_invalid_utf8_inside_a_string_does_not_raise() -> None:
    record = raw().replace(b'"alice"', b'"al\xffice"')
    assert isinstance(decode_command(record), Invalid | Undecodable)


@pytest.mark.parametrize(
    "record",
    [
        b"[" * 5000 + b"]" * 5000,
        b'{"command_id": "x", "deep": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"command_id": "x", "deep": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    ],
    ids=["array", "nested-array-field", "nested-object-field"],
)
def test_deeply_nested_json_does_not_raise(record: bytes) -> None:
    assert len(record) <= limits.COMMAND_BYTES_MAX
    assert isinstance(decode_command(record), Invalid | Undecodable)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    for internal in (False, True):
        got = decode_command(data, internal=internal)
        assert isinstance(got, Invalid | Undecodable | msgspec.Struct)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(
            ["kind", "command_id", "account", "asset", "amount", "v", "to", "legs", "hold_id", "x"]
        ),
        json_values
        | st.sampled_from(["deposit", "credit", "cmd-1", "alice", "USD", 1, 2**63, "a/b"]),
    )
)
def test_arbitrary_json_objects_never_raise(obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    for internal in (False, True):
        got = decode_command(data, internal=internal)
        if isinstance(got, Invalid):
            assert got.command_id == obj.get("command_id")
            assert len(got.detail) <= limits.DETAIL_LEN_MAX
            assert got.account in ("", obj.get("account"))


def test_result_and_dead_letter_round_trip() -> None:
    result = Result(
        command_id="d1",
        account="alice",
        kind="duplicate",
        status=Status.DUPLICATE,
        first=FirstResult(status=Status.REJECTED, reason=Reason.INSUFFICIENT_FUNDS, at_ms=5),
        entries=[
            Entry(
                account="alice",
                asset="USD",
                seq=3,
                available=-2,
                held=4,
                delta_available=-6,
                delta_held=4,
            )
        ],
        emitted=2,
        at_ms=9,
    )
    assert decode_result(encode(result)) == result
    letter = DeadLetter(
        reason="malformed JSON",
        source_topic="tally-commands",
        source_partition=3,
        source_offset=17,
        key=None,
        raw="\\xff",
        at_ms=1,
    )
    assert decode_dead_letter(encode(letter)) == letter
    with pytest.raises(msgspec.MsgspecError):
        decode_result(b"{}")


def test_a_rejected_record_kind_with_control_characters_is_not_echoed() -> None:
    """A kind PostgreSQL cannot store (a NUL) would reach the result event, and the sink
    would have to isolate it; the result names no kind instead."""
    decoded = decode_command(b'{"command_id": "k1", "account": "alice", "kind": "de\\u0000p"}')
    assert isinstance(decoded, Invalid) and decoded.kind == ""
    ok = decode_command(b'{"command_id": "k2", "account": "alice", "kind": "Deposit"}')
    assert isinstance(ok, Invalid) and ok.kind == "Deposit"


def _letter(
    raw: bytes, key: bytes | None = b"k", reason: str = "why", keep: int = 4096
) -> DeadLetter:
    return dead_letter(
        reason, topic="t" * 249, partition=3, offset=2**62, key=key, raw=raw, at_ms=1, keep=keep
    )


def test_a_dead_letter_is_bounded_whatever_the_record() -> None:
    # The worst escapes: invalid UTF-8 is "\\xff" (5 bytes in JSON), control characters
    # are "\\u0000" (6 bytes), in the value, the key and the reason alike.
    for byte in (b"\x00", b"\xff", b"\\", b'"'):
        letter = _letter(byte * 300_000, key=byte * 5000, reason="\x00" * 5000)
        assert len(encode(letter)) <= limits.DEAD_LETTER_BYTES_MAX
        assert letter.truncated and letter.raw_len == 300_000


@given(
    raw=st.binary(max_size=10_000),
    key=st.none() | st.binary(max_size=600),
    reason=st.text(max_size=600),
)
@settings(max_examples=200)
def test_dead_letters_round_trip_bounded_with_length_and_digest(
    raw: bytes, key: bytes | None, reason: str
) -> None:
    letter = _letter(raw, key, reason)
    assert len(encode(letter)) <= limits.DEAD_LETTER_BYTES_MAX
    assert decode_dead_letter(encode(letter)) == letter
    assert letter.raw_len == len(raw) and letter.raw_sha256 == hashlib.sha256(raw).hexdigest()
    assert letter.truncated == (len(raw) > limits.DEAD_LETTER_RAW_BYTES_MAX)
    if not letter.truncated:
        # Nothing lost when it fits: backslashreplace is undone by the escape codec
        # for text without backslashes of its own.
        assert letter.raw == raw.decode("utf-8", "backslashreplace")


def test_a_letter_without_the_bytes_keeps_only_length_and_digest() -> None:
    letter = _letter(b"abc" * 10, key=b"key", keep=0)
    assert (letter.raw, letter.key, letter.truncated, letter.raw_len) == ("", None, True, 30)


def test_a_letter_written_before_the_bounds_still_decodes() -> None:
    old = (
        b'{"v":1,"reason":"malformed JSON","source_topic":"tally.commands",'
        b'"source_partition":0,"source_offset":5,"key":null,"raw":"\\\\xff","at_ms":1}'
    )
    letter = decode_dead_letter(old)
    assert (letter.raw, letter.raw_len, letter.raw_sha256, letter.truncated) == (
        "\\xff", None, None, False
    )  # fmt: skip


def test_the_largest_command_writes_records_far_below_the_output_bound() -> None:
    """The engine refuses to write a record over limits.OUTPUT_BYTES_MAX (the batch is
    split and the record answered record_too_large); a legitimate command must never
    come near it. The widest one: a disbursement of DISBURSE_LEGS_MAX legs with the
    longest ids and amounts."""
    from streams import ledger
    from streams.memory import MemoryShard

    payer, cid = "p" * limits.ACCOUNT_ID_LEN_MAX, "c" * limits.COMMAND_ID_LEN_MAX
    shard = MemoryShard()
    shard.commit(ledger.apply(shard, Deposit(command_id="seed", account=payer, asset="A" * 12,
                                             amount=limits.AMOUNT_MAX), 1))  # fmt: skip
    legs = [Leg(to=f"{i:064d}", amount=1) for i in range(limits.DISBURSE_LEGS_MAX)]
    command = Disburse(command_id=cid, account=payer, asset="A" * 12, legs=legs)
    assert len(encode(command)) < limits.COMMAND_BYTES_MAX
    outcome = ledger.apply(shard, command, 2)
    assert outcome.result.status is Status.APPLIED
    largest = max(len(encode(x)) for x in [outcome.result, *outcome.emits])
    assert largest < limits.OUTPUT_BYTES_MAX // 100, largest
