"""Deposits: money in from outside, onto an open or frozen account, up to the amount bound.

Each test runs commands against one in-memory shard, committing every outcome the way
the engine does, and asserts both the result event and the state left behind.
"""

from __future__ import annotations

from streams.memory import MemoryShard
from streams.state import BalanceState
from tests.unit.streams.ledger.support import (
    MAX,
    NOW,
    assert_applied,
    assert_rejected,
    bal,
    configure,
    deposit,
    run,
    snapshot,
)
from topics.schema import (
    Deposit,
    Entry,
    Reason,
    Status,
)


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
