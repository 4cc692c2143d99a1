"""What every command kind shares: idempotency (duplicates, reused ids, rejected commands
retried), validation without memory, seq and entries, purity until commit.

Each test runs commands against one in-memory shard, committing every outcome the way
the engine does, and asserts both the result event and the state left behind.
"""

from __future__ import annotations

from streams.ledger import apply, reject_invalid
from streams.memory import MemoryShard
from streams.state import BalanceState
from tests.unit.streams.ledger.support import (
    NOW,
    assert_applied,
    bal,
    configure,
    credit,
    deposit,
    run,
    snapshot,
)
from topics.codec import Invalid, decode_command
from topics.schema import (
    Capture,
    Command,
    Configure,
    Deposit,
    Entry,
    FirstResult,
    Hold,
    Reason,
    Status,
    Transfer,
    Withdraw,
)


def test_same_command_twice_is_a_duplicate_pointing_at_the_first(shard: MemoryShard) -> None:
    cmd = Deposit(command_id="d1", account="alice", asset="USD", amount=100)
    first = run(shard, cmd, NOW)
    before = snapshot(shard)
    again = run(shard, cmd, NOW + 50)
    assert again.result.status is Status.DUPLICATE
    assert again.result.reason is None
    assert again.result.first == FirstResult(status=Status.APPLIED, reason=None, at_ms=NOW)
    assert again.result.first.status is first.result.status
    assert again.result.entries == [] and again.emits == []
    assert again.result.at_ms == NOW + 50
    assert again.record is None
    assert again.balances == {} and again.accounts == {} and again.holds == {}
    assert snapshot(shard) == before
    assert bal(shard, "alice").available == 100


def test_duplicate_transfer_emits_no_second_credit(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    cmd = Transfer(command_id="t1", account="alice", to="bob", asset="USD", amount=40)
    assert len(run(shard, cmd).emits) == 1
    before = snapshot(shard)
    again = run(shard, cmd)
    assert again.result.status is Status.DUPLICATE
    assert again.emits == [] and again.result.emitted == 0
    assert snapshot(shard) == before


def test_duplicate_is_checked_before_everything_else(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    cmd = Withdraw(command_id="w1", account="alice", asset="USD", amount=100)
    assert_applied(run(shard, cmd))
    assert_applied(configure(shard, "alice", status="frozen"))
    again = run(shard, cmd)  # would now be frozen and short of funds
    assert again.result.status is Status.DUPLICATE
    assert again.result.first is not None and again.result.first.status is Status.APPLIED


def test_same_id_with_different_payload_is_command_id_reused(shard: MemoryShard) -> None:
    first = Deposit(command_id="d1", account="alice", asset="USD", amount=100)
    run(shard, first)
    record = shard.commands[("alice", "d1")]
    before = snapshot(shard)
    other = Deposit(command_id="d1", account="alice", asset="USD", amount=101)
    out = run(shard, other, NOW + 1)
    assert out.result.status is Status.REJECTED
    assert out.result.reason is Reason.COMMAND_ID_REUSED
    assert out.result.first is None
    assert out.record is None
    assert shard.commands[("alice", "d1")] == record
    assert snapshot(shard) == before
    # The original is still recognised as itself.
    again = run(shard, first)
    assert again.result.status is Status.DUPLICATE


def test_same_id_different_kind_is_command_id_reused(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    run(shard, Withdraw(command_id="x", account="alice", asset="USD", amount=1))
    before = snapshot(shard)
    out = run(shard, Transfer(command_id="x", account="alice", to="bob", asset="USD", amount=1))
    assert out.result.reason is Reason.COMMAND_ID_REUSED
    assert out.emits == []
    assert snapshot(shard) == before


def test_retry_of_a_rejected_command_is_a_duplicate_of_the_rejection(shard: MemoryShard) -> None:
    cmd = Withdraw(command_id="w1", account="alice", asset="USD", amount=10)
    first = run(shard, cmd, NOW)
    assert first.result.reason is Reason.INSUFFICIENT_FUNDS
    deposit(shard, "alice", 100)  # the retry would now succeed, but must not apply
    before = snapshot(shard)
    again = run(shard, cmd, NOW + 10)
    assert again.result.status is Status.DUPLICATE
    assert again.result.first == FirstResult(
        status=Status.REJECTED, reason=Reason.INSUFFICIENT_FUNDS, at_ms=NOW
    )
    assert snapshot(shard) == before
    assert bal(shard, "alice").available == 100


def test_redelivered_credit_is_a_duplicate(shard: MemoryShard) -> None:
    assert_applied(run(shard, credit()))
    before = snapshot(shard)
    again = run(shard, credit())
    assert again.result.status is Status.DUPLICATE
    assert again.emits == []
    assert snapshot(shard) == before


def test_redelivered_rejected_credit_is_not_refunded_twice(shard: MemoryShard) -> None:
    assert_applied(configure(shard, "bob", status="closed"))
    assert len(run(shard, credit()).emits) == 1
    again = run(shard, credit())
    assert again.result.status is Status.DUPLICATE
    assert again.result.first is not None
    assert again.result.first.reason is Reason.ACCOUNT_CLOSED
    assert again.emits == []


def test_reject_invalid_answers_without_remembering(shard: MemoryShard) -> None:
    invalid = decode_command(
        b'{"kind":"deposit","command_id":"d1","account":"alice","asset":"USD","amount":1.5}'
    )
    assert isinstance(invalid, Invalid)
    out = reject_invalid(invalid, NOW)
    assert out.result.status is Status.REJECTED
    assert out.result.reason is Reason.INVALID_COMMAND
    assert out.result.command_id == "d1"
    assert out.result.account == "alice"
    assert out.result.kind == "deposit"
    assert out.result.detail == invalid.detail
    assert out.result.at_ms == NOW
    assert out.record is None
    assert out.balances == {} and out.accounts == {} and out.holds == {} and out.emits == []
    shard.commit(out)
    assert shard.commands == {}
    # The id stays free for the corrected command.
    assert_applied(run(shard, Deposit(command_id="d1", account="alice", asset="USD", amount=1)))


def test_reject_invalid_keeps_the_unsupported_version_reason() -> None:
    invalid = Invalid(
        command_id="d1",
        account="",
        kind="deposit",
        reason=Reason.UNSUPPORTED_VERSION,
        detail="Invalid enum value 2 - at `$.v`",
    )
    out = reject_invalid(invalid, NOW)
    assert out.result.reason is Reason.UNSUPPORTED_VERSION
    assert out.result.account == ""
    assert out.record is None


# Seq and entries ----------------------------------------------------------------------


def test_seq_increments_by_one_per_entry_per_balance(shard: MemoryShard) -> None:
    cmds: list[Command] = [
        Deposit(command_id="1", account="alice", asset="USD", amount=100),
        Deposit(command_id="2", account="alice", asset="BTC", amount=7),
        Withdraw(command_id="3", account="alice", asset="USD", amount=10),
        Withdraw(command_id="4", account="alice", asset="USD", amount=1000),  # rejected
        Hold(command_id="5", account="alice", hold_id="h", asset="USD", amount=20),
        Configure(command_id="6", account="alice", asset="USD", overdraft_limit=5),
        Deposit(command_id="1", account="alice", asset="USD", amount=100),  # duplicate
        Capture(command_id="7", account="alice", hold_id="h", amount=5, to="bob"),
        Deposit(command_id="8", account="bob", asset="USD", amount=1),
        Transfer(command_id="9", account="alice", to="bob", asset="BTC", amount=2),
    ]
    entries: list[Entry] = []
    for cmd in cmds:
        entries.extend(run(shard, cmd).result.entries)
    usd = [e for e in entries if (e.account, e.asset) == ("alice", "USD")]
    btc = [e for e in entries if (e.account, e.asset) == ("alice", "BTC")]
    bob = [e for e in entries if e.account == "bob"]
    assert [e.seq for e in usd] == [1, 2, 3, 4]
    assert [e.seq for e in btc] == [1, 2]
    assert [e.seq for e in bob] == [1]
    assert bal(shard, "alice", "USD").seq == 4
    assert bal(shard, "alice", "BTC").seq == 2
    # Each entry carries the balance after it, and consecutive entries chain by deltas.
    for series in (usd, btc):
        prev_available = prev_held = 0
        for e in series:
            assert e.available == prev_available + e.delta_available
            assert e.held == prev_held + e.delta_held
            prev_available, prev_held = e.available, e.held
    assert (usd[-1].available, usd[-1].held) == (90 - 20 + 15, 0)
    assert bal(shard, "alice", "USD") == BalanceState(85, 0, 4, 5)
    assert (btc[-1].available, btc[-1].held) == (5, 0)


def test_rejected_and_duplicate_results_carry_no_entries(shard: MemoryShard) -> None:
    cmd = Withdraw(command_id="w", account="alice", asset="USD", amount=1)
    rejected = run(shard, cmd)
    duplicate = run(shard, cmd)
    assert rejected.result.status is Status.REJECTED
    assert duplicate.result.status is Status.DUPLICATE, duplicate.result
    assert rejected.result.entries == [] and duplicate.result.entries == []
    assert shard.balance("alice", "USD") is None


def test_apply_is_pure_until_commit(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    before = snapshot(shard)
    out = apply(
        shard, Transfer(command_id="t", account="alice", to="bob", asset="USD", amount=1), NOW
    )
    assert out.result.status is Status.APPLIED
    assert snapshot(shard) == before
