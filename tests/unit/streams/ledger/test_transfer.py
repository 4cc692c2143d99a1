"""Transfers: the payer debited, one credit emitted for the payee's shard.

Each test runs commands against one in-memory shard, committing every outcome the way
the engine does, and asserts both the result event and the state left behind.
"""

from __future__ import annotations

from streams.memory import MemoryShard
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
    Credit,
    Entry,
    Reason,
    Transfer,
)


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
