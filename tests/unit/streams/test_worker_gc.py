"""The worker runs with its own garbage-collector thresholds (see `streams.worker`)."""

from __future__ import annotations

import gc
from collections.abc import Coroutine
from typing import Any

import pytest

from core.settings import Settings
from streams import worker


def test_a_worker_runs_the_engine_with_its_collector_thresholds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[int, int, int]] = []

    def run(main: Coroutine[Any, Any, None]) -> None:
        seen.append(gc.get_threshold())
        main.close()  # not run: only what the loop would start under is looked at

    before = gc.get_threshold()
    monkeypatch.setattr(worker.asyncio, "run", run)
    monkeypatch.setattr(worker, "setup_logging", lambda *_: None)
    try:
        assert worker.run(Settings()) == 0
    finally:
        gc.set_threshold(*before)
    assert seen == [worker.gc_thresholds]
    assert worker.gc_thresholds[0] > before[0]  # rarer than CPython's default
