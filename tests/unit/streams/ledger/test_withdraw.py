"""Withdrawals: money out, from available funds only, refused on a frozen or closed account.

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
    run,
    snapshot,
)
from topics.schema import (
    Entry,
    Reason,
    Withdraw,
)


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
