"""`tally bench decide` decides every command of its workload once, on the shard the
commands topic would hold it on, and writes what it decided to the stores: its
counts come from the real loop's pieces, and `--instructions` reads cachegrind's count."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from bench import decide
from core.settings import Settings


def test_every_command_is_decided_once_and_its_outputs_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handled: Counter[tuple[int, int]] = Counter()
    real = decide.Records.handle

    def counting(self: Any, p: int, store: Any, record: Any, *args: Any) -> None:
        assert record.partition == p
        handled[(p, record.offset)] += 1
        real(self, p, store, record, *args)

    monkeypatch.setattr(decide.Records, "handle", counting)
    result = decide.run(Settings(), count=2000, partitions=4)
    assert sum(handled.values()) == 2000 and set(handled.values()) == {1}
    assert {p for p, _ in handled} == {0, 1, 2, 3}
    # At least a result per command, and changelog records besides.
    assert result["outputs"] > 2000 and result["cpu_s"] > 0
    assert decide.run(Settings(), count=1000, partitions=4, setup_only=True)["outputs"] == 0


def test_the_instruction_count_is_read_from_cachegrinds_summary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[list[str]] = []

    def fake(argv: list[str], **_: Any) -> Any:
        seen.append(argv)
        count = "1,000,000" if "--setup-only" in argv else "3,000,000"
        return type("Done", (), {"returncode": 0, "stderr": f"==1== I   refs:      {count}\n"})

    monkeypatch.setattr(decide.subprocess, "run", fake)
    assert decide._instructions(1000, 8, setup_only=False) == 3_000_000
    assert decide._instructions(1000, 8, setup_only=True) == 1_000_000
    assert seen[0][:2] == ["valgrind", "--tool=cachegrind"] and "--setup-only" in seen[1]
