"""The CPU accounting behind `tally bench engine`'s "cores used over the drain" lines."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.engine import CpuClock, local_broker, pid_cpu_s
from core.settings import Settings
from harness.cluster import local_broker_pid
from harness.faults import FaultUnavailable


def _burn(seconds: float) -> None:
    """Use about `seconds` of this process's CPU (bounded by twice that in wall time)."""
    start, deadline = time.process_time(), time.monotonic() + 2 * seconds + 5
    while time.process_time() - start < seconds and time.monotonic() < deadline:
        sum(range(10_000))


def test_a_process_cpu_seconds_grow_with_the_work_it_does() -> None:
    before = pid_cpu_s(os.getpid())
    _burn(0.3)
    # /proc counts in clock ticks (10 ms); the burn is 30 of them.
    assert pid_cpu_s(os.getpid()) - before >= 0.2


def test_a_process_that_is_gone_has_no_cpu_seconds() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert math.isnan(pid_cpu_s(gone.pid))


def _pidfile(cache: Path, pid: int) -> None:
    (cache / "kafka").mkdir(parents=True)
    (cache / "kafka" / "kafka.pid").write_text(f"{pid}\n")


def test_the_local_broker_is_the_live_kafka_process_of_the_services_pidfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in whose command line names kafka.Kafka, as the broker's JVM does; it says
    # so once it runs (before that, its /proc command line may still be pytest's).
    broker = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)",
         "kafka.Kafka"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert broker.stdout is not None and broker.stdout.readline() == "up\n"
    try:
        _pidfile(tmp_path, broker.pid)
        monkeypatch.setenv("TALLY_CACHE_DIR", str(tmp_path))
        assert local_broker_pid() == broker.pid
        assert local_broker(Settings()) == broker.pid
        assert pid_cpu_s(broker.pid) >= 0
    finally:
        broker.kill()
        broker.wait()


def test_a_pidfile_of_some_other_process_is_no_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pidfile(tmp_path, os.getpid())  # this pytest process: not kafka.Kafka
    monkeypatch.setenv("TALLY_CACHE_DIR", str(tmp_path))
    with pytest.raises(FaultUnavailable):
        local_broker_pid()
    assert local_broker(Settings()) is None


def test_no_pidfile_is_no_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALLY_CACHE_DIR", str(tmp_path))
    assert local_broker(Settings()) is None


def test_cpu_is_read_over_the_window_the_rate_is_taken_over() -> None:
    """The drain's window is known only afterwards (it may begin with the first result,
    before every worker is ready): the CPU samples around each end are interpolated, and
    a process not started yet (NaN) counts as having used nothing."""
    readings = iter([[math.nan, 5.0], [1.0, 5.5], [3.0, 6.0]])
    clock = CpuClock(lambda: next(readings))
    for at in (0.0, 1.0, 2.0):
        clock.sample()
        clock.samples[-1] = (at, clock.samples[-1][1])
    assert clock.samples[0][1] == [0.0, 5.0]
    assert clock.between(0.5, 1.5) == pytest.approx([1.5, 0.5])
    assert clock.between(0.0, 2.0) == pytest.approx([3.0, 1.0])
    # Outside the samples: the nearest one.
    assert clock.between(-1.0, 5.0) == pytest.approx([3.0, 1.0])
