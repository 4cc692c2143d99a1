"""A store that is down is waited out on the same call (sinks/retry.py), and it is the
runner's current store that is retried and reopened: a caller may replace the store of
a runner it built (tests/integration/sink_support.py does) before it runs."""

from __future__ import annotations

from sinks.batch import Batch
from sinks.runner import SinkRunner
from topics.specs import topics_for


class _Store:
    name = "flaky"

    def __init__(self, unavailable: tuple[type[BaseException], ...], down_for: int) -> None:
        self.unavailable = unavailable
        self.down_for = down_for  # writes refused before it answers
        self.writes = self.opens = 0

    async def open(self) -> None:
        self.opens += 1

    async def close(self) -> None: ...

    async def offsets(self, topic: str) -> dict[int, int]:
        return {}

    async def write(self, batch: Batch) -> None:
        self.writes += 1
        if self.writes <= self.down_for:
            raise ConnectionRefusedError("down")


async def test_the_replaced_store_is_the_one_retried_and_the_outage_counted_once() -> None:
    first = _Store(unavailable=(), down_for=0)
    runner = SinkRunner(
        first,  # type: ignore[arg-type]
        bootstrap="127.0.0.1:1",
        topics=topics_for("t", 1),
        group_id=None,
        partitions=[0],
    )
    second = _Store(unavailable=(ConnectionRefusedError,), down_for=2)
    runner.store = second  # type: ignore[assignment]
    await runner._write(Batch(topic="t.events", offsets={0: 1}))
    assert (second.writes, second.opens, first.writes) == (3, 2, 0)
    assert runner.outages == 1 and runner.down_since is None
