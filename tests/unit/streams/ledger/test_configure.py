"""Configure: an account's status (frozen, closed) and its overdraft limits.

Each test runs commands against one in-memory shard, committing every outcome the way
the engine does, and asserts both the result event and the state left behind.
"""

from __future__ import annotations

from streams.memory import MemoryShard
from streams.state import BalanceState
from tests.unit.streams.ledger.support import (
    assert_applied,
    assert_rejected,
    bal,
    configure,
    deposit,
    hold,
    run,
    snapshot,
)
from topics.schema import (
    Deposit,
    Reason,
    Withdraw,
)


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
