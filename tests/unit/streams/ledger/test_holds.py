"""Holds and what ends them: release, capture (whole, partial, to another account) and expiry.

Each test runs commands against one in-memory shard, committing every outcome the way
the engine does, and asserts both the result event and the state left behind.
"""

from __future__ import annotations

from streams.memory import MemoryShard
from streams.state import BalanceState, HoldState
from tests.unit.streams.ledger.support import (
    NOW,
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
    Capture,
    Credit,
    Entry,
    Expire,
    Reason,
    Release,
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
