"""Disbursements: one debit for the total, one credit per leg.

Each test runs commands against one in-memory shard, committing every outcome the way
the engine does, and asserts both the result event and the state left behind.
"""

from __future__ import annotations

from streams.memory import MemoryShard
from tests.unit.streams.ledger.support import (
    MAX,
    assert_applied,
    assert_rejected,
    configure,
    deposit,
    run,
    snapshot,
)
from topics.schema import (
    Credit,
    Disburse,
    Entry,
    Leg,
    Reason,
)


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
