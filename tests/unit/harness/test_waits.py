"""The failover measure (harness.waits): per shard the longest wait for a result and the
longest silence with commands pending, the grouping of shards by owner, and the
exactly-once count, on made-up send and answer times."""

from __future__ import annotations

from typing import Any

import pytest

from harness.waits import exactly_once, group, longest_silence, moved, owners, shard_waits


def test_a_steady_shard_is_silent_no_longer_than_its_spacing() -> None:
    # Sent every 0.1 s, each answered 0.02 s later: never more than 0.02 s pending alone.
    commands = [(i / 10, i / 10 + 0.02) for i in range(10)]
    assert longest_silence(commands) == pytest.approx(0.02)


def test_a_stopped_shard_is_silent_from_its_last_answer_to_its_next() -> None:
    # Answers at 0.05 and 0.15, then nothing until 3.0 (three commands queued meanwhile).
    commands = [(0.0, 0.05), (0.1, 0.15), (0.2, 3.0), (0.3, 3.0), (1.0, 3.1)]
    assert longest_silence(commands) == pytest.approx(3.0 - 0.2)
    waits = shard_waits({i: (5, s) for i, (s, _) in enumerate(commands)},
                        {i: a for i, (_, a) in enumerate(commands)}, until=4.0)  # fmt: skip
    assert waits[5].max_wait_s == pytest.approx(2.8)
    assert waits[5].max_silence_s == pytest.approx(2.8)
    assert (waits[5].commands, waits[5].answered) == (5, 5)


def test_an_idle_stretch_is_not_a_silence() -> None:
    # Nothing pending between 0.1 and 5.0: the shard was idle, not stopped.
    assert longest_silence([(0.0, 0.1), (5.0, 5.2)]) == pytest.approx(0.2)


def test_an_unanswered_command_waits_until_the_end_of_the_watch() -> None:
    waits = shard_waits({"a": (0, 1.0), "b": (0, 2.0)}, {"a": 1.5}, until=10.0)
    assert waits[0].answered == 1
    assert waits[0].max_wait_s == pytest.approx(8.0)
    assert waits[0].max_silence_s == pytest.approx(8.0)


def test_only_commands_sent_in_the_window_count() -> None:
    sent = {"early": (0, 0.0), "in": (0, 5.0), "late": (1, 9.0)}
    answered = {"early": 4.0, "in": 5.5, "late": 9.1}
    waits = shard_waits(sent, answered, until=10.0, start=1.0, end=8.0)
    assert list(waits) == [0]
    assert waits[0].max_wait_s == pytest.approx(0.5)


def test_groups_take_the_worst_of_their_shards() -> None:
    sent = {1: (0, 0.0), 2: (1, 0.0), 3: (2, 0.0)}
    waits = shard_waits(sent, {1: 1.0, 2: 3.0}, until=7.0)
    kept = group("kept", waits, [0, 1])
    assert (kept.shards, kept.commands, kept.unanswered) == ([0, 1], 2, 0)
    assert kept.max_wait_s == pytest.approx(3.0)
    lost = group("moved", waits, [2, 3])
    assert (lost.commands, lost.unanswered) == (1, 1)
    assert lost.max_wait_s == pytest.approx(7.0)
    assert group("none", waits, []).max_wait_s == 0.0


def test_a_shard_moved_when_its_owner_changed_or_it_was_unserved() -> None:
    before = {0: 0, 1: 0, 2: 1, 3: 1}
    after = {0: 0, 1: 1, 2: 1}
    assert moved(before, after) == ([0, 2], [1, 3])


def test_exactly_once_names_the_missing_and_the_doubled() -> None:
    results = {"a": [object()], "b": [object(), object()]}
    assert exactly_once(["a", "b", "c"], results) == (["c"], ["b"])


class _Worker:
    def __init__(self, body: dict[str, Any] | Exception) -> None:
        self.body = body

    async def readyz(self) -> dict[str, Any]:
        if isinstance(self.body, Exception):
            raise self.body
        return self.body


async def test_owners_come_from_each_workers_readyz_and_a_dead_one_serves_nothing() -> None:
    workers = [
        _Worker({"serving": [0, 2]}),
        None,
        _Worker(ConnectionRefusedError()),
        _Worker({"serving": [1]}),
    ]
    assert await owners(workers) == {0: 0, 2: 0, 1: 3}
