"""The chaos run's waits per fault: each fault's window runs from just before it to just
before the next, its shards are kept or moved by the owners read before it and before
the next fault (after the drain for the last), and the report prints one line each."""

from __future__ import annotations

import pytest

from harness.chaos.plan import Fault
from harness.chaos.record import Run, render
from harness.chaos.waits import Mark, fault_waits


def _fault(kind: str, at_s: float) -> Fault:
    return Fault(at_s=at_s, kind=kind, pick=0.0, pause_s=1.0)


def test_each_fault_gets_its_window_and_its_kept_and_moved_shards() -> None:
    marks = [
        Mark(_fault("kill9", 10.0), at=110.0, at_s=10.0, owners={0: 0, 1: 0, 2: 1, 3: 1}),
        Mark(_fault("sigstop", 30.0), at=130.0, at_s=30.0, owners={0: 0, 1: 1, 2: 1, 3: 1}),
    ]
    final = {0: 0, 1: 1, 2: 2, 3: 2}
    sent = {
        b"0:1": (0, 109.0),  # before the first window: counts nowhere
        b"1:1": (1, 111.0),  # shard 1 moved at the kill: waited 5 s
        b"0:2": (0, 112.0),  # shard 0 kept: waited 0.5 s
        b"2:1": (2, 131.0),  # after the sigstop, shard 2 moved: waited 3 s
        b"3:1": (3, 132.0),  # shard 3 moved too, and never answered: waits to the end
    }
    heard = {b"0:1": 130.0, b"1:1": 116.0, b"0:2": 112.5, b"2:1": 134.0}
    kill, stop = fault_waits(marks, final, sent, heard, until=150.0)
    assert (kill.kind, kill.at_s) == ("kill9", 10.0)
    assert kill.kept.shards == [0, 2, 3] and kill.moved.shards == [1]
    assert kill.kept.max_wait_s == pytest.approx(0.5)
    assert kill.moved.max_wait_s == pytest.approx(5.0)
    assert stop.owners_after == final
    assert stop.kept.shards == [0, 1] and stop.moved.shards == [2, 3]
    assert stop.kept.commands == 0
    assert stop.moved.unanswered == 1
    assert stop.moved.max_wait_s == pytest.approx(18.0)


def test_the_report_has_a_line_per_fault() -> None:
    marks = [Mark(_fault("kill9", 5.0), at=5.0, at_s=5.0, owners={0: 0, 1: 1})]
    waits = fault_waits(marks, {0: 0, 1: 0}, {b"0:0": (0, 6.0)}, {b"0:0": 8.25}, until=9.0)
    run = Run(seed=1, duration_s=10, rate=1, plan=[marks[0].fault], waits=waits)
    text = render(run)
    assert "t+  5.0s  kill9           kept [0] wait 2.2s silence 2.2s; moved [1] wait" in text
    assert "none measured" in render(Run(seed=1, duration_s=10, rate=1, plan=[]))


def test_the_struck_workers_shards_are_a_group_of_their_own_even_when_they_come_back() -> None:
    # Worker 0 killed and restarted within the session timeout: its shards come back to
    # it (they did not move) but waited for it; worker 1's kept theirs and did not wait.
    owners = {0: 0, 1: 0, 2: 1, 3: 1}
    marks = [Mark(_fault("kill9", 5.0), at=5.0, at_s=5.0, owners=owners, struck=0)]
    sent = {b"0:0": (0, 6.0), b"2:0": (2, 6.0)}
    heard = {b"0:0": 13.0, b"2:0": 6.2}
    (kill,) = fault_waits(marks, owners, sent, heard, until=20.0)
    assert kill.struck is not None and kill.struck_worker == 0
    assert (kill.struck.name, kill.struck.shards) == ("worker-0's", [0, 1])
    assert kill.struck.max_wait_s == pytest.approx(7.0)
    assert kill.kept.shards == [2, 3] and kill.kept.max_wait_s == pytest.approx(0.2)
    assert kill.moved.shards == []
    assert kill.line().endswith("moved none; worker-0's [0, 1] wait 7.0s silence 7.0s")
