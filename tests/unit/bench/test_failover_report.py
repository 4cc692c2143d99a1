"""`tally bench failover`'s printed result and verdict: one line per shard marked by the
group it was in at the fault, one per group, the exactly-once line; a run with a command
unanswered or answered twice ends in a BenchError that names them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import failover
from bench.errors import BenchError
from core.settings import Settings
from harness.waits import GroupWait, ShardWait


def _result(**changes: Any) -> failover.FailoverResult:
    fields: dict[str, Any] = {
        "fault": "kill", "workers": 2, "partitions": 2, "rate": 100, "restart_after_s": 2.0,
        "duration_s": 30.0, "transfer_share": 0.0, "victim": 0, "exit_code": -9,
        "warm_s": 0.5, "fault_s": 5.5, "restart_s": 7.5, "load_end_s": 30.0, "answered_s": 30.2,
        "owners_before": {0: 0, 1: 1}, "owners_after": {0: 0, 1: 1},
        "produced": 10, "results": 10, "unanswered": [], "doubled": [],
        "groups": [GroupWait("survivors worker-1", [1], 5, 0, 1.5, 1.25),
                   GroupWait("killed worker-0", [0], 5, 0, 9.0, 8.75)],
        "shards": [ShardWait(0, 5, 5, 9.0, 8.75), ShardWait(1, 5, 5, 1.5, 1.25)],
    }  # fmt: skip
    fields.update(changes)
    return failover.FailoverResult(**fields)


def test_the_report_marks_each_shard_by_its_group_at_the_fault() -> None:
    lines = failover.render(_result())
    assert lines[0].startswith("failover: kill of worker-0 of 2 (exit -9), restart after 2.0s")
    shard_rows = [line for line in lines if line[:1].isdigit()]
    assert shard_rows[0].split()[:4] == ["0", "failed", "w0", "w0"]
    assert shard_rows[1].split()[:4] == ["1", "survivor", "w1", "w1"]
    assert any(line.startswith("killed worker-0") and "9.00" in line for line in lines)
    assert lines[-1].endswith("0 unanswered, 0 answered more than once (ok)")


def test_a_command_unanswered_or_doubled_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bad = _result(unanswered=["fo-1"], doubled=["fo-2", "fo-3"], results=10)
    assert "(FAILED)" in failover.render(bad)[-1]

    async def run(settings: Settings, **options: Any) -> failover.FailoverResult:
        return bad

    monkeypatch.setattr(failover, "run", run)
    with pytest.raises(BenchError, match=r"1 commands unanswered \(e.g. fo-1\), 2 answered"):
        failover.main(Settings(data_dir=str(tmp_path)))
