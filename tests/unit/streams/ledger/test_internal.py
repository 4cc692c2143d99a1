"""The internal commands a transfer or disbursement emits: credits to the payee and refunds
when a credit is refused.

Each test runs commands against one in-memory shard, committing every outcome the way
the engine does, and asserts both the result event and the state left behind.
"""

from __future__ import annotations

from streams.memory import MemoryShard
from streams.state import BalanceState
from tests.unit.streams.ledger.support import (
    MAX,
    assert_applied,
    assert_rejected,
    bal,
    configure,
    credit,
    deposit,
    run,
    snapshot,
)
from topics.schema import (
    Entry,
    Reason,
    Refund,
    Transfer,
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
