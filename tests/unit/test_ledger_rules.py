"""Example-based tests of every ledger rule and every rejection reason `apply` can produce.

Each test runs commands against one in-memory shard, committing every outcome the way
the engine does, and asserts both the result event and the state left behind.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from streams.ledger import Outcome, apply, reject_invalid
from streams.memory import MemoryShard
from streams.state import BalanceState, HoldState
from topics import limits
from topics.codec import Invalid, decode_command
from topics.schema import (
    Capture,
    Command,
    Configure,
    Credit,
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
    Status,
    Transfer,
    Withdraw,
)

NOW = 1_700_000_000_000
MAX = limits.AMOUNT_MAX


def run(shard: MemoryShard, command: Command, now: int = NOW) -> Outcome:
    """Apply one command and commit its outcome, as the engine does."""
    outcome = apply(shard, command, now)
    shard.commit(outcome)
    return outcome


def snapshot(shard: MemoryShard) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "balances": shard.balances,
            "accounts": shard.accounts,
            "holds": shard.holds,
            "commands": shard.commands,
        }
    )


def bal(shard: MemoryShard, account: str, asset: str = "USD") -> BalanceState:
    found = shard.balance(account, asset)
    assert found is not None, f"no balance for {account} {asset}"
    return found


def deposit(shard: MemoryShard, account: str, amount: int, asset: str = "USD") -> Outcome:
    outcome = run(
        shard,
        Deposit(
            command_id=f"dep-{account}-{asset}-{len(shard.commands)}",
            account=account,
            asset=asset,
            amount=amount,
        ),
    )
    assert outcome.result.status is Status.APPLIED, outcome.result
    return outcome


def configure(shard: MemoryShard, account: str, cid: str | None = None, **fields: Any) -> Outcome:
    cid = cid or f"cfg-{account}-{len(shard.commands)}"
    return run(shard, Configure(command_id=cid, account=account, **fields))


def assert_applied(outcome: Outcome) -> None:
    assert outcome.result.status is Status.APPLIED, outcome.result
    assert outcome.result.reason is None
    assert outcome.record is not None and outcome.record.status is Status.APPLIED


def assert_rejected(
    outcome: Outcome, reason: Reason, before: dict[str, Any], shard: MemoryShard
) -> None:
    """Rejected with `reason`; nothing changed but the command's own idempotency record."""
    result = outcome.result
    assert result.status is Status.REJECTED, result
    assert result.reason is reason, result
    assert result.entries == []
    after = snapshot(shard)
    for table in ("balances", "accounts", "holds"):
        assert after[table] == before[table], table
    new_commands = {k: v for k, v in after["commands"].items() if k not in before["commands"]}
    assert set(new_commands) == {(result.account, result.command_id)}
    record = new_commands[(result.account, result.command_id)]
    assert record.status is Status.REJECTED
    assert record.reason is reason


@pytest.fixture
def shard() -> MemoryShard:
    return MemoryShard()


# Deposit ------------------------------------------------------------------------------


def test_deposit_credits_available_and_records_one_entry(shard: MemoryShard) -> None:
    out = run(shard, Deposit(command_id="d1", account="alice", asset="USD", amount=100))
    assert_applied(out)
    assert out.result.entries == [
        Entry(
            account="alice",
            asset="USD",
            seq=1,
            available=100,
            held=0,
            delta_available=100,
            delta_held=0,
        )
    ]
    assert out.emits == [] and out.result.emitted == 0
    assert out.result.kind == "deposit"
    assert out.result.at_ms == NOW
    assert bal(shard, "alice") == BalanceState(available=100, held=0, seq=1, overdraft_limit=0)
    assert shard.accounts["alice"].assets == ("USD",)
    assert shard.commands[("alice", "d1")].status is Status.APPLIED


def test_deposit_allowed_on_frozen_account(shard: MemoryShard) -> None:
    assert_applied(configure(shard, "alice", status="frozen"))
    out = run(shard, Deposit(command_id="d1", account="alice", asset="USD", amount=5))
    assert_applied(out)
    assert bal(shard, "alice").available == 5


def test_deposit_to_closed_account_is_rejected(shard: MemoryShard) -> None:
    assert_applied(configure(shard, "alice", status="closed"))
    before = snapshot(shard)
    out = run(shard, Deposit(command_id="d1", account="alice", asset="USD", amount=5))
    assert_rejected(out, Reason.ACCOUNT_CLOSED, before, shard)
    assert shard.balance("alice", "USD") is None


def test_deposit_over_int64_is_balance_overflow(shard: MemoryShard) -> None:
    deposit(shard, "alice", MAX)
    before = snapshot(shard)
    out = run(shard, Deposit(command_id="d2", account="alice", asset="USD", amount=1))
    assert_rejected(out, Reason.BALANCE_OVERFLOW, before, shard)
    assert bal(shard, "alice") == BalanceState(MAX, 0, 1, 0)


def test_deposit_up_to_int64_max_is_applied(shard: MemoryShard) -> None:
    deposit(shard, "alice", MAX - 1)
    out = run(shard, Deposit(command_id="d2", account="alice", asset="USD", amount=1))
    assert_applied(out)
    assert bal(shard, "alice").available == MAX


# Withdraw -----------------------------------------------------------------------------


def test_withdraw_debits_available(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    out = run(shard, Withdraw(command_id="w1", account="alice", asset="USD", amount=30))
    assert_applied(out)
    assert out.result.entries == [
        Entry(
            account="alice",
            asset="USD",
            seq=2,
            available=70,
            held=0,
            delta_available=-30,
            delta_held=0,
        )
    ]
    assert out.emits == []
    assert bal(shard, "alice") == BalanceState(70, 0, 2, 0)


def test_withdraw_everything_leaves_zero(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    assert_applied(run(shard, Withdraw(command_id="w1", account="alice", asset="USD", amount=100)))
    assert bal(shard, "alice").available == 0


def test_withdraw_more_than_available_is_insufficient_funds(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    before = snapshot(shard)
    out = run(shard, Withdraw(command_id="w1", account="alice", asset="USD", amount=101))
    assert_rejected(out, Reason.INSUFFICIENT_FUNDS, before, shard)


def test_withdraw_from_unknown_account_is_insufficient_funds(shard: MemoryShard) -> None:
    before = snapshot(shard)
    out = run(shard, Withdraw(command_id="w1", account="nobody", asset="USD", amount=1))
    assert_rejected(out, Reason.INSUFFICIENT_FUNDS, before, shard)


def test_withdraw_other_asset_is_insufficient_funds(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100, "USD")
    before = snapshot(shard)
    out = run(shard, Withdraw(command_id="w1", account="alice", asset="BTC", amount=1))
    assert_rejected(out, Reason.INSUFFICIENT_FUNDS, before, shard)


def test_withdraw_from_frozen_account_is_rejected_before_funds(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    assert_applied(configure(shard, "alice", status="frozen"))
    before = snapshot(shard)
    out = run(shard, Withdraw(command_id="w1", account="alice", asset="USD", amount=10))
    assert_rejected(out, Reason.ACCOUNT_FROZEN, before, shard)
    # Status is checked before funds: an overdrawing withdraw is still "frozen".
    before = snapshot(shard)
    out = run(shard, Withdraw(command_id="w2", account="alice", asset="USD", amount=10_000))
    assert_rejected(out, Reason.ACCOUNT_FROZEN, before, shard)


def test_withdraw_from_closed_account_is_account_closed(shard: MemoryShard) -> None:
    assert_applied(configure(shard, "alice", status="closed"))
    before = snapshot(shard)
    out = run(shard, Withdraw(command_id="w1", account="alice", asset="USD", amount=1))
    assert_rejected(out, Reason.ACCOUNT_CLOSED, before, shard)


# Transfer -----------------------------------------------------------------------------


def test_transfer_debits_payer_and_emits_one_credit(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    out = run(shard, Transfer(command_id="t1", account="alice", to="bob", asset="USD", amount=40))
    assert_applied(out)
    # Only the payer's balance changes here; the payee is credited on its own shard.
    assert out.result.entries == [
        Entry(
            account="alice",
            asset="USD",
            seq=2,
            available=60,
            held=0,
            delta_available=-40,
            delta_held=0,
        )
    ]
    assert shard.balance("bob", "USD") is None
    assert out.emits == [
        Credit(
            command_id="alice/t1/credit",
            account="bob",
            asset="USD",
            amount=40,
            origin_command_id="t1",
            origin_account="alice",
        )
    ]
    assert out.result.emitted == 1


def test_transfer_credit_applies_on_payee_shard(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    out = run(shard, Transfer(command_id="t1", account="alice", to="bob", asset="USD", amount=40))
    payee = MemoryShard()
    (credit,) = out.emits
    got = run(payee, credit)
    assert_applied(got)
    assert got.result.kind == "credit"
    assert got.result.entries == [
        Entry(
            account="bob",
            asset="USD",
            seq=1,
            available=40,
            held=0,
            delta_available=40,
            delta_held=0,
        )
    ]
    assert got.emits == []
    assert bal(payee, "bob").available == 40


def test_transfer_to_self_is_same_account_before_status_and_funds(shard: MemoryShard) -> None:
    assert_applied(configure(shard, "alice", status="frozen"))
    before = snapshot(shard)
    out = run(shard, Transfer(command_id="t1", account="alice", to="alice", asset="USD", amount=5))
    assert_rejected(out, Reason.SAME_ACCOUNT, before, shard)
    assert out.emits == []


def test_transfer_insufficient_funds_emits_nothing(shard: MemoryShard) -> None:
    deposit(shard, "alice", 10)
    before = snapshot(shard)
    out = run(shard, Transfer(command_id="t1", account="alice", to="bob", asset="USD", amount=11))
    assert_rejected(out, Reason.INSUFFICIENT_FUNDS, before, shard)
    assert out.emits == [] and out.result.emitted == 0


def test_transfer_from_frozen_account_is_rejected(shard: MemoryShard) -> None:
    deposit(shard, "alice", 10)
    assert_applied(configure(shard, "alice", status="frozen"))
    before = snapshot(shard)
    out = run(shard, Transfer(command_id="t1", account="alice", to="bob", asset="USD", amount=1))
    assert_rejected(out, Reason.ACCOUNT_FROZEN, before, shard)
    assert out.emits == []


def test_transfer_from_closed_account_is_rejected(shard: MemoryShard) -> None:
    assert_applied(configure(shard, "alice", status="closed"))
    before = snapshot(shard)
    out = run(shard, Transfer(command_id="t1", account="alice", to="bob", asset="USD", amount=1))
    assert_rejected(out, Reason.ACCOUNT_CLOSED, before, shard)


# Disburse -----------------------------------------------------------------------------


def test_disburse_debits_the_total_and_emits_one_credit_per_leg(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    legs = [Leg(to="bob", amount=3), Leg(to="carol", amount=4), Leg(to="bob", amount=5)]
    out = run(shard, Disburse(command_id="x1", account="alice", asset="USD", legs=legs))
    assert_applied(out)
    assert out.result.entries == [
        Entry(
            account="alice",
            asset="USD",
            seq=2,
            available=88,
            held=0,
            delta_available=-12,
            delta_held=0,
        )
    ]
    assert out.emits == [
        Credit(
            command_id=f"alice/x1/credit/{i}",
            account=leg.to,
            asset="USD",
            amount=leg.amount,
            origin_command_id="x1",
            origin_account="alice",
        )
        for i, leg in enumerate(legs)
    ]
    assert out.result.emitted == 3
    assert shard.balance("bob", "USD") is None and shard.balance("carol", "USD") is None


def test_disburse_leg_paying_self_is_same_account(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    before = snapshot(shard)
    legs = [Leg(to="bob", amount=1), Leg(to="alice", amount=1)]
    out = run(shard, Disburse(command_id="x1", account="alice", asset="USD", legs=legs))
    assert_rejected(out, Reason.SAME_ACCOUNT, before, shard)
    assert out.result.detail is not None and "legs[1]" in out.result.detail
    assert out.emits == []


def test_disburse_total_over_int64_is_balance_overflow(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    before = snapshot(shard)
    legs = [Leg(to="bob", amount=MAX), Leg(to="carol", amount=1)]
    out = run(shard, Disburse(command_id="x1", account="alice", asset="USD", legs=legs))
    assert_rejected(out, Reason.BALANCE_OVERFLOW, before, shard)
    assert out.emits == []


def test_disburse_total_exactly_int64_max_is_only_short_of_funds(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    before = snapshot(shard)
    legs = [Leg(to="bob", amount=MAX - 1), Leg(to="carol", amount=1)]
    out = run(shard, Disburse(command_id="x1", account="alice", asset="USD", legs=legs))
    assert_rejected(out, Reason.INSUFFICIENT_FUNDS, before, shard)


def test_disburse_needs_funds_for_the_total(shard: MemoryShard) -> None:
    deposit(shard, "alice", 10)
    before = snapshot(shard)
    legs = [Leg(to="bob", amount=6), Leg(to="carol", amount=5)]
    out = run(shard, Disburse(command_id="x1", account="alice", asset="USD", legs=legs))
    assert_rejected(out, Reason.INSUFFICIENT_FUNDS, before, shard)
    assert out.emits == []


def test_disburse_from_frozen_account_is_rejected(shard: MemoryShard) -> None:
    deposit(shard, "alice", 10)
    assert_applied(configure(shard, "alice", status="frozen"))
    before = snapshot(shard)
    legs = [Leg(to="bob", amount=1)]
    out = run(shard, Disburse(command_id="x1", account="alice", asset="USD", legs=legs))
    assert_rejected(out, Reason.ACCOUNT_FROZEN, before, shard)


# Hold, release, capture, expire -------------------------------------------------------


def hold(
    shard: MemoryShard,
    amount: int,
    hold_id: str = "h1",
    account: str = "alice",
    expires: int | None = None,
    cid: str = "hold1",
) -> Outcome:
    return run(
        shard,
        Hold(
            command_id=cid,
            account=account,
            hold_id=hold_id,
            asset="USD",
            amount=amount,
            expires_at_ms=expires,
        ),
    )


def test_hold_moves_available_to_held(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    out = hold(shard, 30, expires=NOW + 1000)
    assert_applied(out)
    assert out.result.entries == [
        Entry(
            account="alice",
            asset="USD",
            seq=2,
            available=70,
            held=30,
            delta_available=-30,
            delta_held=30,
        )
    ]
    assert bal(shard, "alice") == BalanceState(70, 30, 2, 0)
    assert shard.hold("alice", "h1") == HoldState("USD", 30, NOW + 1000)
    assert out.emits == []


def test_hold_with_existing_id_is_hold_exists_before_funds(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    assert_applied(hold(shard, 30))
    before = snapshot(shard)
    out = hold(shard, 1000, cid="hold2")  # also more than available: hold_exists wins
    assert_rejected(out, Reason.HOLD_EXISTS, before, shard)


def test_hold_more_than_available_is_insufficient_funds(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    before = snapshot(shard)
    assert_rejected(hold(shard, 101), Reason.INSUFFICIENT_FUNDS, before, shard)


def test_hold_expiring_now_or_before_is_hold_expired(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    before = snapshot(shard)
    assert_rejected(hold(shard, 1, expires=NOW), Reason.HOLD_EXPIRED, before, shard)
    before = snapshot(shard)
    assert_rejected(hold(shard, 1, expires=0, cid="hold2"), Reason.HOLD_EXPIRED, before, shard)


def test_hold_on_frozen_account_is_rejected(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    assert_applied(configure(shard, "alice", status="frozen"))
    before = snapshot(shard)
    assert_rejected(hold(shard, 1), Reason.ACCOUNT_FROZEN, before, shard)


def test_release_gives_the_hold_back(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30)
    out = run(shard, Release(command_id="r1", account="alice", hold_id="h1"))
    assert_applied(out)
    assert out.result.entries == [
        Entry(
            account="alice",
            asset="USD",
            seq=3,
            available=100,
            held=0,
            delta_available=30,
            delta_held=-30,
        )
    ]
    assert shard.hold("alice", "h1") is None
    assert bal(shard, "alice") == BalanceState(100, 0, 3, 0)


def test_release_unknown_hold_is_hold_not_found(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    before = snapshot(shard)
    out = run(shard, Release(command_id="r1", account="alice", hold_id="nope"))
    assert_rejected(out, Reason.HOLD_NOT_FOUND, before, shard)


def test_release_twice_is_hold_not_found(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30)
    assert_applied(run(shard, Release(command_id="r1", account="alice", hold_id="h1")))
    before = snapshot(shard)
    out = run(shard, Release(command_id="r2", account="alice", hold_id="h1"))
    assert_rejected(out, Reason.HOLD_NOT_FOUND, before, shard)


def test_release_allowed_on_frozen_account(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30)
    assert_applied(configure(shard, "alice", status="frozen"))
    out = run(shard, Release(command_id="r1", account="alice", hold_id="h1"))
    assert_applied(out)
    assert bal(shard, "alice").available == 100 and bal(shard, "alice").held == 0


def test_capture_whole_hold_out_of_the_system(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30)
    out = run(shard, Capture(command_id="c1", account="alice", hold_id="h1"))
    assert_applied(out)
    assert out.result.entries == [
        Entry(
            account="alice",
            asset="USD",
            seq=3,
            available=70,
            held=0,
            delta_available=0,
            delta_held=-30,
        )
    ]
    assert out.emits == [] and out.result.emitted == 0
    assert shard.hold("alice", "h1") is None


def test_partial_capture_releases_the_rest(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30)
    out = run(shard, Capture(command_id="c1", account="alice", hold_id="h1", amount=12))
    assert_applied(out)
    assert out.result.entries == [
        Entry(
            account="alice",
            asset="USD",
            seq=3,
            available=88,
            held=0,
            delta_available=18,
            delta_held=-30,
        )
    ]
    assert bal(shard, "alice") == BalanceState(88, 0, 3, 0)
    assert shard.hold("alice", "h1") is None


def test_capture_to_another_account_emits_a_credit(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30)
    out = run(shard, Capture(command_id="c1", account="alice", hold_id="h1", amount=10, to="bob"))
    assert_applied(out)
    assert out.emits == [
        Credit(
            command_id="alice/c1/credit",
            account="bob",
            asset="USD",
            amount=10,
            origin_command_id="c1",
            origin_account="alice",
        )
    ]
    assert out.result.emitted == 1
    assert bal(shard, "alice") == BalanceState(90, 0, 3, 0)
    assert shard.balance("bob", "USD") is None


def test_capture_to_the_holding_account_is_same_account(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30)
    before = snapshot(shard)
    out = run(shard, Capture(command_id="c1", account="alice", hold_id="h1", to="alice"))
    assert_rejected(out, Reason.SAME_ACCOUNT, before, shard)


def test_capture_after_expiry_is_hold_expired(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30, expires=NOW + 1000)
    before = snapshot(shard)
    out = run(shard, Capture(command_id="c1", account="alice", hold_id="h1"), NOW + 1000)
    assert_rejected(out, Reason.HOLD_EXPIRED, before, shard)
    before = snapshot(shard)
    out = run(shard, Capture(command_id="c2", account="alice", hold_id="h1"), NOW + 5000)
    assert_rejected(out, Reason.HOLD_EXPIRED, before, shard)


def test_capture_just_before_expiry_is_applied(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30, expires=NOW + 1000)
    out = run(shard, Capture(command_id="c1", account="alice", hold_id="h1"), NOW + 999)
    assert_applied(out)
    # Settled, not merely answered: the 30 held left the system and the hold is gone.
    assert [(e.available, e.held, e.delta_available, e.delta_held) for e in out.result.entries] == [
        (70, 0, 0, -30)
    ]
    assert bal(shard, "alice") == BalanceState(70, 0, 3, 0)
    assert shard.hold("alice", "h1") is None


def test_capture_more_than_the_hold_is_amount_exceeds_hold(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30)
    before = snapshot(shard)
    out = run(shard, Capture(command_id="c1", account="alice", hold_id="h1", amount=31))
    assert_rejected(out, Reason.AMOUNT_EXCEEDS_HOLD, before, shard)
    assert shard.hold("alice", "h1") == HoldState("USD", 30, None)


def test_capture_unknown_hold_is_hold_not_found(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    before = snapshot(shard)
    out = run(shard, Capture(command_id="c1", account="alice", hold_id="h1"))
    assert_rejected(out, Reason.HOLD_NOT_FOUND, before, shard)


def test_capture_on_frozen_account_is_rejected_before_hold_checks(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30)
    assert_applied(configure(shard, "alice", status="frozen"))
    before = snapshot(shard)
    out = run(shard, Capture(command_id="c1", account="alice", hold_id="h1"))
    assert_rejected(out, Reason.ACCOUNT_FROZEN, before, shard)
    before = snapshot(shard)
    out = run(shard, Capture(command_id="c2", account="alice", hold_id="missing"))
    assert_rejected(out, Reason.ACCOUNT_FROZEN, before, shard)


def test_expire_before_expiry_is_hold_not_expired(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30, expires=NOW + 1000)
    before = snapshot(shard)
    out = run(shard, Expire(command_id="e1", account="alice", hold_id="h1"), NOW + 999)
    assert_rejected(out, Reason.HOLD_NOT_EXPIRED, before, shard)
    assert shard.hold("alice", "h1") is not None


def test_expire_hold_without_expiry_is_hold_not_expired(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30)
    before = snapshot(shard)
    out = run(shard, Expire(command_id="e1", account="alice", hold_id="h1"), NOW + 10**9)
    assert_rejected(out, Reason.HOLD_NOT_EXPIRED, before, shard)


def test_expire_after_expiry_releases_the_hold(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    hold(shard, 30, expires=NOW + 1000)
    assert_applied(configure(shard, "alice", status="frozen"))  # expiry ignores status
    out = run(shard, Expire(command_id="e1", account="alice", hold_id="h1"), NOW + 1000)
    assert_applied(out)
    assert out.result.kind == "expire"
    assert out.result.entries == [
        Entry(
            account="alice",
            asset="USD",
            seq=3,
            available=100,
            held=0,
            delta_available=30,
            delta_held=-30,
        )
    ]
    assert shard.hold("alice", "h1") is None


def test_expire_unknown_hold_is_hold_not_found(shard: MemoryShard) -> None:
    before = snapshot(shard)
    out = run(shard, Expire(command_id="e1", account="alice", hold_id="h1"))
    assert_rejected(out, Reason.HOLD_NOT_FOUND, before, shard)


# Configure ----------------------------------------------------------------------------


def test_frozen_account_keeps_its_status_in_state(shard: MemoryShard) -> None:
    deposit(shard, "alice", 100)
    out = configure(shard, "alice", status="frozen")
    assert_applied(out)
    assert out.result.entries == []
    assert shard.accounts["alice"].status == "frozen"
    assert shard.accounts["alice"].assets == ("USD",)
    assert_applied(configure(shard, "alice", status="active"))
    assert_applied(run(shard, Withdraw(command_id="w1", account="alice", asset="USD", amount=1)))


def test_closing_an_account_with_funds_is_account_not_empty(shard: MemoryShard) -> None:
    deposit(shard, "alice", 5, "BTC")
    before = snapshot(shard)
    out = configure(shard, "alice", status="closed")
    assert_rejected(out, Reason.ACCOUNT_NOT_EMPTY, before, shard)
    assert shard.accounts["alice"].status == "active"


def test_closing_an_account_with_only_held_funds_is_account_not_empty(shard: MemoryShard) -> None:
    deposit(shard, "alice", 5)
    hold(shard, 5)
    assert bal(shard, "alice").available == 0
    before = snapshot(shard)
    assert_rejected(
        configure(shard, "alice", status="closed"), Reason.ACCOUNT_NOT_EMPTY, before, shard
    )


def test_closing_an_overdrawn_account_is_account_not_empty(shard: MemoryShard) -> None:
    assert_applied(configure(shard, "alice", asset="USD", overdraft_limit=10))
    assert_applied(run(shard, Withdraw(command_id="w1", account="alice", asset="USD", amount=3)))
    before = snapshot(shard)
    assert_rejected(
        configure(shard, "alice", status="closed"), Reason.ACCOUNT_NOT_EMPTY, before, shard
    )


def test_closing_an_emptied_account_then_deposits_are_refused(shard: MemoryShard) -> None:
    deposit(shard, "alice", 5)
    assert_applied(run(shard, Withdraw(command_id="w1", account="alice", asset="USD", amount=5)))
    assert_applied(configure(shard, "alice", status="closed"))
    assert shard.accounts["alice"].status == "closed"
    before = snapshot(shard)
    out = run(shard, Deposit(command_id="d9", account="alice", asset="USD", amount=1))
    assert_rejected(out, Reason.ACCOUNT_CLOSED, before, shard)


def test_overdraft_limit_allows_down_to_minus_limit_and_no_further(shard: MemoryShard) -> None:
    deposit(shard, "alice", 10)
    assert_applied(configure(shard, "alice", asset="USD", overdraft_limit=50))
    out = run(shard, Withdraw(command_id="w1", account="alice", asset="USD", amount=60))
    assert_applied(out)
    assert bal(shard, "alice").available == -50
    assert out.result.entries[0].available == -50
    before = snapshot(shard)
    out = run(shard, Withdraw(command_id="w2", account="alice", asset="USD", amount=1))
    assert_rejected(out, Reason.INSUFFICIENT_FUNDS, before, shard)
    assert out.result.detail is not None and "50" in out.result.detail


def test_overdraft_limit_applies_per_asset(shard: MemoryShard) -> None:
    assert_applied(configure(shard, "alice", asset="USD", overdraft_limit=50))
    before = snapshot(shard)
    out = run(shard, Withdraw(command_id="w1", account="alice", asset="BTC", amount=1))
    assert_rejected(out, Reason.INSUFFICIENT_FUNDS, before, shard)


def test_overdraft_limit_lets_a_hold_go_negative(shard: MemoryShard) -> None:
    assert_applied(configure(shard, "alice", asset="USD", overdraft_limit=20))
    assert_applied(hold(shard, 20))
    assert bal(shard, "alice") == BalanceState(-20, 20, 1, 20)
    before = snapshot(shard)
    assert_rejected(
        hold(shard, 1, hold_id="h2", cid="hold2"), Reason.INSUFFICIENT_FUNDS, before, shard
    )


def test_limit_change_bumps_no_seq_and_emits_no_entry(shard: MemoryShard) -> None:
    deposit(shard, "alice", 10)
    out = configure(shard, "alice", asset="USD", overdraft_limit=7)
    assert_applied(out)
    assert out.result.entries == []
    assert out.emits == []
    assert bal(shard, "alice") == BalanceState(10, 0, 1, 7)
    # The next real change is seq 2: the limit change did not take a number.
    out = run(shard, Withdraw(command_id="w1", account="alice", asset="USD", amount=15))
    assert_applied(out)
    assert out.result.entries[0].seq == 2


def test_limit_on_a_fresh_balance_starts_at_seq_zero(shard: MemoryShard) -> None:
    assert_applied(configure(shard, "alice", asset="BTC", overdraft_limit=3))
    assert bal(shard, "alice", "BTC") == BalanceState(0, 0, 0, 3)
    out = run(shard, Withdraw(command_id="w1", account="alice", asset="BTC", amount=3))
    assert_applied(out)
    assert out.result.entries[0].seq == 1
    assert bal(shard, "alice", "BTC") == BalanceState(-3, 0, 1, 3)


def test_status_and_limit_in_one_command(shard: MemoryShard) -> None:
    out = configure(shard, "alice", status="frozen", asset="USD", overdraft_limit=9)
    assert_applied(out)
    assert shard.accounts["alice"].status == "frozen"
    assert bal(shard, "alice").overdraft_limit == 9


def test_configure_with_nothing_is_nothing_to_configure(shard: MemoryShard) -> None:
    before = snapshot(shard)
    out = configure(shard, "alice")
    assert_rejected(out, Reason.NOTHING_TO_CONFIGURE, before, shard)


def test_configure_asset_without_limit_is_invalid_command(shard: MemoryShard) -> None:
    before = snapshot(shard)
    out = configure(shard, "alice", status="frozen", asset="USD")
    assert_rejected(out, Reason.INVALID_COMMAND, before, shard)
    assert "alice" not in shard.accounts  # the status half was not applied either


def test_configure_limit_without_asset_is_invalid_command(shard: MemoryShard) -> None:
    before = snapshot(shard)
    out = configure(shard, "alice", overdraft_limit=5)
    assert_rejected(out, Reason.INVALID_COMMAND, before, shard)


# Internal commands: credit, refund -----------------------------------------------------


def credit(account: str = "bob", amount: int = 40, cid: str = "t1/credit") -> Credit:
    return Credit(
        command_id=cid,
        account=account,
        asset="USD",
        amount=amount,
        origin_command_id="t1",
        origin_account="alice",
    )


def test_credit_to_frozen_account_is_applied(shard: MemoryShard) -> None:
    assert_applied(configure(shard, "bob", status="frozen"))
    out = run(shard, credit())
    assert_applied(out)
    assert out.emits == []
    assert bal(shard, "bob").available == 40


def test_credit_to_closed_account_is_rejected_and_refunded(shard: MemoryShard) -> None:
    assert_applied(configure(shard, "bob", status="closed"))
    before = snapshot(shard)
    out = run(shard, credit())
    assert_rejected(out, Reason.ACCOUNT_CLOSED, before, shard)
    assert out.emits == [
        Refund(
            command_id="t1/credit/refund",
            account="alice",
            asset="USD",
            amount=40,
            origin_command_id="t1",
            reason="account_closed",
        )
    ]
    assert out.result.emitted == 1


def test_credit_that_would_overflow_is_rejected_and_refunded(shard: MemoryShard) -> None:
    deposit(shard, "bob", MAX)
    before = snapshot(shard)
    out = run(shard, credit())
    assert_rejected(out, Reason.BALANCE_OVERFLOW, before, shard)
    (refund,) = out.emits
    assert isinstance(refund, Refund)
    assert refund.account == "alice" and refund.amount == 40
    assert refund.reason == "balance_overflow"


def test_refund_applies_to_closed_account(shard: MemoryShard) -> None:
    assert_applied(configure(shard, "alice", status="closed"))
    refund = Refund(
        command_id="t1/credit/refund",
        account="alice",
        asset="USD",
        amount=40,
        origin_command_id="t1",
        reason="account_closed",
    )
    out = run(shard, refund)
    assert_applied(out)
    assert out.result.entries == [
        Entry(
            account="alice",
            asset="USD",
            seq=1,
            available=40,
            held=0,
            delta_available=40,
            delta_held=0,
        )
    ]
    assert out.emits == []


def test_refund_applies_to_frozen_account(shard: MemoryShard) -> None:
    deposit(shard, "alice", 1)
    assert_applied(configure(shard, "alice", status="frozen"))
    refund = Refund(
        command_id="t1/credit/refund",
        account="alice",
        asset="USD",
        amount=40,
        origin_command_id="t1",
        reason="account_closed",
    )
    assert_applied(run(shard, refund))
    assert bal(shard, "alice").available == 41


def test_transfer_to_closed_account_round_trip_restores_the_payer() -> None:
    payer, payee = MemoryShard(), MemoryShard()
    deposit(payer, "alice", 100)
    assert_applied(configure(payee, "bob", status="closed"))
    out = run(payer, Transfer(command_id="t1", account="alice", to="bob", asset="USD", amount=40))
    (credit_cmd,) = out.emits
    rejected = run(payee, credit_cmd)
    assert rejected.result.reason is Reason.ACCOUNT_CLOSED
    (refund,) = rejected.emits
    back = run(payer, refund)
    assert_applied(back)
    assert bal(payer, "alice") == BalanceState(100, 0, 3, 0)
    assert payee.balance("bob", "USD") is None


# Idempotency --------------------------------------------------------------------------


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


# Money at the bounds: 128-bit amounts, a cap on credits, returns never refused ----------

TWO_127 = 2**127 - 1


def test_finding_1_refund_meets_a_full_balance_and_money_is_kept(shard: MemoryShard) -> None:
    """Deposit 100, transfer 100 to a closed account, deposit 2^63-1 before the refund
    comes back: the refund must apply, or the 100 exist nowhere."""
    configure(shard, "closed", status="closed")
    deposit(shard, "ovr", 100)
    out = run(shard, Transfer(command_id="t", account="ovr", to="closed", asset="USD", amount=100))
    assert_applied(out)
    (credit,) = out.emits
    deposit(shard, "ovr", 2**63 - 1)
    rejected = run(shard, credit)
    assert rejected.result.reason is Reason.ACCOUNT_CLOSED
    (refund,) = rejected.emits
    back = run(shard, refund)
    assert_applied(back)
    assert bal(shard, "ovr").available == 2**63 - 1 + 100
    total = sum(b.available + b.held for b in shard.balances.values())
    assert total == 100 + 2**63 - 1, "money destroyed"


def test_refund_applies_above_the_credit_cap(shard: MemoryShard) -> None:
    """At the cap itself a refund still applies: it returns money the account had."""
    configure(shard, "closed", status="closed")
    deposit(shard, "ovr", TWO_127)
    out = run(shard, Transfer(command_id="t", account="ovr", to="closed", asset="USD", amount=7))
    deposit(shard, "ovr", 7)
    (refund,) = run(shard, out.emits[0]).emits
    assert_applied(run(shard, refund))
    assert bal(shard, "ovr").available == limits.BALANCE_MAX + 7


def test_release_and_expire_apply_above_the_credit_cap(shard: MemoryShard) -> None:
    """A release gives back the balance's own money: never balance_overflow, or the hold
    would stay stuck for ever (and the engine would retry its expiry for ever)."""
    deposit(shard, "alice", TWO_127)
    h1 = Hold(command_id="h", account="alice", hold_id="h1", asset="USD", amount=TWO_127 - 1)
    h2 = Hold(command_id="g", account="alice", hold_id="h2", asset="USD", amount=1,
              expires_at_ms=NOW + 1)  # fmt: skip
    assert_applied(run(shard, h1))
    assert_applied(run(shard, h2))
    deposit(shard, "alice", TWO_127)
    assert_applied(run(shard, Release(command_id="r", account="alice", hold_id="h1")))
    expired = run(shard, Expire(command_id="e/expire", account="alice", hold_id="h2"), NOW + 1)
    assert_applied(expired)
    assert bal(shard, "alice") == BalanceState(2 * TWO_127, 0, 6, 0)


def test_deposit_to_the_cap_is_applied_and_one_more_is_overflow(shard: MemoryShard) -> None:
    deposit(shard, "alice", TWO_127 - 1)
    assert_applied(run(shard, Deposit(command_id="x", account="alice", asset="USD", amount=1)))
    before = snapshot(shard)
    out = run(shard, Deposit(command_id="y", account="alice", asset="USD", amount=1))
    assert_rejected(out, Reason.BALANCE_OVERFLOW, before, shard)


def test_credit_above_the_cap_is_refunded_not_lost(shard: MemoryShard) -> None:
    deposit(shard, "bob", TWO_127)
    credit = Credit(command_id="a/t/credit", account="bob", asset="USD", amount=TWO_127,
                    origin_command_id="t", origin_account="a")  # fmt: skip
    out = run(shard, credit)
    assert out.result.reason is Reason.BALANCE_OVERFLOW
    (refund,) = out.emits
    assert (refund.account, refund.amount) == ("a", TWO_127)


def test_hold_beyond_the_held_cap_is_overflow(shard: MemoryShard) -> None:
    configure(shard, "alice", asset="USD", overdraft_limit=TWO_127)
    deposit(shard, "alice", TWO_127)
    run(shard, Hold(command_id="h", account="alice", hold_id="h1", asset="USD", amount=TWO_127))
    before = snapshot(shard)
    out = run(shard, Hold(command_id="g", account="alice", hold_id="h2", asset="USD", amount=1))
    assert_rejected(out, Reason.BALANCE_OVERFLOW, before, shard)


@pytest.mark.parametrize("amount", [1, 2**53, 2**63 - 1, 2**63, 2**64, 2**100 + 7, TWO_127])
def test_amounts_at_every_bound_move_exactly(shard: MemoryShard, amount: int) -> None:
    """A deposit, a transfer and its credit, and a withdrawal at each width boundary."""
    deposit(shard, "alice", amount)
    out = run(
        shard, Transfer(command_id="t", account="alice", to="bob", asset="USD", amount=amount)
    )
    assert_applied(out)
    assert_applied(run(shard, out.emits[0]))
    assert_applied(run(shard, Withdraw(command_id="w", account="bob", asset="USD", amount=amount)))
    assert bal(shard, "alice").available == 0 and bal(shard, "bob").available == 0
    assert [e.delta_available for e in out.result.entries] == [-amount]


def test_overdraft_floor_reaches_minus_the_amount_bound(shard: MemoryShard) -> None:
    configure(shard, "bob", asset="USD", overdraft_limit=TWO_127)
    assert_applied(run(shard, Withdraw(command_id="w", account="bob", asset="USD", amount=TWO_127)))
    before = snapshot(shard)
    out = run(shard, Withdraw(command_id="w2", account="bob", asset="USD", amount=1))
    assert_rejected(out, Reason.INSUFFICIENT_FUNDS, before, shard)
    assert bal(shard, "bob").available == -TWO_127


def _asset(i: int) -> str:
    return f"A{i:05d}"


def test_an_account_holds_at_most_the_asset_bound_and_a_credit_past_it_is_refunded(
    shard: MemoryShard,
) -> None:
    """Found while bounding the engine's outputs (#13): an account crediting itself into
    ever more assets grew its settings value past the engine's output bound, after which
    a payee's credit could only be isolated (dead-lettered) and its money was lost. The
    asset count is bounded; the credit past it is refunded; what the account already
    holds still moves."""
    for i in range(limits.ACCOUNT_ASSETS_MAX):
        deposit(shard, "whale", 1, asset=_asset(i))
    before = snapshot(shard)
    one_more = Deposit(command_id="more", account="whale", asset="NEW", amount=5)
    assert_rejected(run(shard, one_more), Reason.TOO_MANY_ASSETS, before, shard)
    credit = Credit(command_id="payer/t/credit", account="whale", asset="NEW", amount=7,
                    origin_command_id="t", origin_account="payer")  # fmt: skip
    out = run(shard, credit)
    assert out.result.reason is Reason.TOO_MANY_ASSETS
    (refund,) = out.emits
    assert (refund.account, refund.asset, refund.amount) == ("payer", "NEW", 7)
    whale = shard.account("whale")
    assert whale is not None and len(whale.assets) == limits.ACCOUNT_ASSETS_MAX
    assert "NEW" not in whale.assets
    assert_applied(deposit(shard, "whale", 3, asset=_asset(0)))
    assert bal(shard, "whale", _asset(0)).available == 4
