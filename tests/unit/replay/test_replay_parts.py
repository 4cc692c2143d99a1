"""Pure parts of `tally replay`: where a batch's offsets are filed, how progress moves,
where a replay stops reading, the summary, and the store named in messages."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.structs import TopicPartition

from core.progress import Progress
from core.settings import Settings
from replay.checks import describe_store
from replay.offsets import OffsetsAside
from replay.run import Summary, _advance
from sinks.runner import Batch, SinkRunner
from topics.codec import encode
from topics.schema import Entry, Result, Status
from topics.specs import topics_for


class _Recorder:
    name = "fake"
    unavailable: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self) -> None:
        self.written: list[Batch] = []

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def offsets(self, topic: str) -> dict[int, int]:
        return {}

    async def write(self, batch: Batch) -> None:
        self.written.append(batch)


def _result(i: int) -> Result:
    entry = Entry(
        account="a", asset="USD", seq=i + 1, available=i + 1, held=0, delta_available=1,
        delta_held=0,
    )  # fmt: skip
    return Result(
        command_id=f"c-{i}", account="a", kind="deposit", status=Status.APPLIED,
        entries=[entry], at_ms=0,
    )  # fmt: skip


def _runner(until: dict[int, int] | None, group_id: str | None = None) -> SinkRunner:
    return SinkRunner(
        _Recorder(),
        bootstrap="127.0.0.1:1",
        topics=topics_for("t", 2),
        group_id=group_id,
        partitions=[0, 1],
        until=until,
    )


async def test_a_replay_files_its_offsets_apart_and_writes_the_same_rows() -> None:
    inner = _Recorder()
    store = OffsetsAside(inner, "t.events#replay")
    batch = Batch(topic="t.events", events=[(0, _result(0))], offsets={0: 1})
    await store.write(batch)
    (written,) = inner.written
    assert written.topic == "t.events#replay" and batch.topic == "t.events"
    assert written.events == batch.events and written.offsets == batch.offsets
    assert (store.name, store.unavailable) == (inner.name, inner.unavailable)


def test_progress_moves_by_the_offsets_each_batch_covers() -> None:
    lines: list[str] = []
    progress = Progress("replay", 30, say=lines.append, tty=False, every_s=3600)
    on_batch = _advance(progress, {0: 0, 1: 10})
    on_batch(Batch(topic="t", offsets={0: 5}))
    on_batch(Batch(topic="t", offsets={0: 9, 1: 14}))  # a marker at 5 counts as covered
    assert progress.done == 13


def test_a_replay_reads_nothing_at_or_past_its_end_offsets() -> None:
    runner = _runner({0: 3, 1: 0})
    tp0, tp1 = TopicPartition("t.events", 0), TopicPartition("t.events", 1)

    def record(tp: TopicPartition, offset: int) -> Any:
        return SimpleNamespace(offset=offset, value=encode(_result(offset)), topic=tp.topic)

    batch, letters = runner._decode(
        {tp0: [record(tp0, o) for o in range(5)], tp1: [record(tp1, 0)]}
    )
    assert [r.command_id for _, r in batch.events] == ["c-0", "c-1", "c-2"]
    assert batch.offsets == {0: 3} and letters == []


def test_a_replay_runner_assigns_its_partitions_and_joins_no_group() -> None:
    with pytest.raises(ValueError, match="joins no group"):
        _runner({0: 1}, group_id="g")
    with pytest.raises(ValueError, match="assigns its partitions"):
        SinkRunner(
            _Recorder(), bootstrap="x", topics=topics_for("t", 2), group_id=None, until={0: 1}
        )


def test_the_summary_gives_counts_time_and_rates() -> None:
    summary = Summary(
        target="redis", store="Redis keys t:* at redis://h", events=1000, entries=2500,
        undecodable=0, offsets=1010, seconds=2.0, completed=True,
    )  # fmt: skip
    text = "\n".join(summary.lines())
    assert summary.events_per_s == 500 and summary.entries_per_s == 1250
    assert text.startswith("replay redis: done, into Redis keys t:*")
    assert "1,000" in text and "2,500" in text and "undecodable" not in text
    stopped = dataclasses.replace(summary, completed=False, undecodable=3)
    assert "INTERRUPTED" in stopped.lines()[0] and "undecodable" in stopped.lines()[-1]


def test_messages_name_the_store_without_its_password() -> None:
    settings = Settings(pg_dsn="postgresql://tally:s3cret@db:5432/tally", topic_prefix="p")
    assert describe_store(settings, "postgres") == (
        "PostgreSQL schema p at postgresql://tally:***@db:5432/tally"
    )
    assert describe_store(settings, "redis").startswith("Redis keys p:* at redis://")
