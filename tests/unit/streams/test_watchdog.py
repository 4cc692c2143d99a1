"""The watchdog: a partition is stalled when records have waited for `stall_after_s` and
its offset has not moved in that time; progress, catching up or losing the partition
clears it, and a quiet spell before records arrive does not count."""

from __future__ import annotations

from streams.watchdog import Watchdog

P0 = ("tally.commands", 0)
P1 = ("tally.commands", 1)


def _dog(now: float = 100.0) -> Watchdog:
    dog = Watchdog(stall_after_s=30)
    dog.assigned([P0, P1], now)
    return dog


def test_waiting_records_without_progress_become_a_stall_after_the_limit() -> None:
    dog = _dog()
    dog.seen(P0, end=50, committed=10, now=100.0)
    assert dog.partitions[P0].lag == 40
    assert dog.stalled(129.9) == []
    assert dog.stalled(130.0) == [P0]
    assert dog.stalled_for(P0, 145.0) == 45.0
    assert dog.stalled_for(P1, 145.0) == 0.0  # nothing known to wait there


def test_progress_restarts_the_clock_and_no_lag_is_never_a_stall() -> None:
    dog = _dog()
    dog.seen(P0, end=50, committed=10, now=100.0)
    dog.advanced(P0, 20, now=125.0)
    assert dog.stalled(150.0) == []
    assert dog.stalled(155.0) == [P0]
    dog.advanced(P0, 50, now=160.0)  # caught up: idle, not stalled, however long
    assert dog.partitions[P0].lag == 0
    assert dog.stalled(10_000.0) == []


def test_the_same_offset_reported_again_is_not_progress() -> None:
    dog = _dog()
    dog.seen(P0, end=50, committed=10, now=100.0)
    dog.advanced(P0, 10, now=120.0)
    dog.advanced(P0, 10, now=140.0)
    assert dog.stalled(131.0) == [P0]


def test_each_stall_is_reported_once_until_it_clears() -> None:
    dog = _dog()
    dog.seen(P0, end=50, committed=10, now=100.0)
    assert dog.newly_stalled(131.0) == [P0]
    assert dog.newly_stalled(200.0) == []
    dog.advanced(P0, 11, now=201.0)
    assert dog.newly_stalled(300.0) == [P0]


def test_a_partition_given_up_is_forgotten_and_a_new_one_starts_fresh() -> None:
    dog = _dog()
    dog.seen(P0, end=50, committed=10, now=100.0)
    dog.assigned([P1], now=120.0)
    assert P0 not in dog.partitions
    dog.advanced(P0, 99, now=121.0)  # no longer ours: ignored
    dog.seen(P0, end=500, committed=0, now=100.0)
    assert P0 not in dog.partitions
    dog.assigned([P0, P1], now=200.0)
    dog.seen(P0, end=50, committed=10, now=200.0)
    assert dog.stalled(229.0) == [] and dog.stalled(230.0) == [P0]


def test_a_burst_after_a_quiet_spell_is_not_a_stall_until_it_has_waited() -> None:
    # Issue #13 finding 6: idle for 136 s (nothing to do, so the offset did not move),
    # then a burst; the old clock, counted from the last move, called it stalled at once.
    dog = _dog()
    dog.seen(P0, end=10, committed=10, now=100.0)
    dog.advanced(P0, 10, now=100.0)
    dog.seen(P0, end=500, committed=None, now=236.0)
    assert dog.stalled_for(P0, 236.0) == 0.0
    assert dog.newly_stalled(265.9) == []
    assert dog.stalled(266.0) == [P0]


def test_the_waiting_clock_restarts_each_time_the_partition_catches_up() -> None:
    dog = _dog()
    dog.seen(P0, end=50, committed=10, now=100.0)
    dog.advanced(P0, 50, now=110.0)  # caught up
    dog.seen(P0, end=60, committed=None, now=200.0)
    assert dog.stalled(229.0) == [] and dog.stalled(230.0) == [P0]
