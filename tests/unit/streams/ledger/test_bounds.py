"""Money at the bounds: 128-bit amounts, a cap on credits, returns never refused, the asset
bound of an account.

Each test runs commands against one in-memory shard, committing every outcome the way
the engine does, and asserts both the result event and the state left behind.
"""

from __future__ import annotations

import pytest

from streams.memory import MemoryShard
from streams.state import BalanceState
from tests.unit.streams.ledger.support import (
    NOW,
    TWO_127,
    assert_applied,
    assert_rejected,
    bal,
    configure,
    deposit,
    run,
    snapshot,
)
from topics import limits
from topics.schema import (
    Credit,
    Deposit,
    Expire,
    Hold,
    Reason,
    Release,
    Transfer,
    Withdraw,
)


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
