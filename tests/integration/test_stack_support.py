"""The deployment fixtures' starting and stopping (tests/integration/stack_support.py):
whatever fails, no process outlives the fixture. Fake processes: this is about the
order of starts and stops, not about the processes."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.stack_support import started


class Fake:
    """A process that takes a moment to start, or fails to."""

    def __init__(self, name: str, log: list[str], *, fails: bool = False, delay_s: float = 0):
        self.name, self.log, self.fails, self.delay_s = name, log, fails, delay_s
        self.running = False

    async def start(self) -> None:
        await asyncio.sleep(self.delay_s)
        if self.fails:
            raise RuntimeError(f"{self.name} did not start")
        self.running = True
        self.log.append(f"start {self.name}")

    async def stop(self) -> int:
        self.running = False
        self.log.append(f"stop {self.name}")
        return 0


async def test_a_start_that_fails_stops_every_process_already_started() -> None:
    log: list[str] = []
    engine = Fake("engine", log)
    first, broken = Fake("first", log, delay_s=0.05), Fake("broken", log, fails=True)
    with pytest.raises(RuntimeError, match="broken did not start"):
        async with started([engine], [broken, first]):
            raise AssertionError("the tests ran although a process did not start")
    # The slower sibling finished starting before anything was stopped, then stopped.
    assert not engine.running and not first.running
    assert log == ["start engine", "start first", "stop broken", "stop first", "stop engine"]


async def test_a_failing_test_body_stops_every_process_the_last_stage_first() -> None:
    log: list[str] = []
    procs = [Fake(n, log) for n in ("engine", "a", "b")]
    with pytest.raises(ValueError):
        async with started(procs[:1], procs[1:]):
            assert all(p.running for p in procs)
            raise ValueError
    assert not any(p.running for p in procs)
    assert log[3:] == ["stop a", "stop b", "stop engine"]
