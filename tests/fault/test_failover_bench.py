"""`tally bench failover`, short: two engine workers of its own under a steady load, one
killed with SIGKILL and restarted. The test holds the report's shape and exactly-once
answering; how long the shards waited is the benchmark's to print, not a bar here (a
shared 2-core machine makes timings noisy)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import failover
from core.settings import Settings

PARTITIONS = 4


async def test_a_killed_worker_leaves_every_command_answered_once(
    settings: Settings, tmp_path: Path
) -> None:
    report = tmp_path / "failover.json"
    lines: list[str] = []
    result = await failover.run(
        settings,
        workers=2,
        partitions=PARTITIONS,
        rate=120,
        fault="kill",
        restart_after_s=1.0,
        duration_s=9.0,
        steady_s=1.0,
        report=report,
        work_root=tmp_path / "work",
        say=lines.append,
    )
    assert result.ok, "\n".join(lines)
    assert result.exit_code == -9
    assert result.produced > 0 and result.results == result.produced
    assert not result.unanswered and not result.doubled
    # The shards served at the fault (all of them, unless a rebalance was still under
    # way: a note says so) fall in one group each: the killed worker's and the others'.
    survivors, failed = result.groups
    assert failed.name == f"killed worker-{result.victim}"
    assert failed.shards, "the killed worker served nothing"
    assert not set(survivors.shards) & set(failed.shards)
    assert sorted(survivors.shards + failed.shards) == sorted(result.owners_before)
    assert set(result.owners_before) <= set(range(PARTITIONS))
    assert failed.shards == sorted(s for s, n in result.owners_before.items() if n == result.victim)
    assert survivors.unanswered == failed.unanswered == 0
    # One line per shard, each with commands that were all answered and waits measured.
    assert [w.shard for w in result.shards] == list(range(PARTITIONS))
    for w in result.shards:
        assert w.commands > 0 and w.answered == w.commands
        assert 0 <= w.max_silence_s <= w.max_wait_s
    assert any(line.startswith("exactly once:") and "(ok)" in line for line in lines)
    written = json.loads(report.read_text())
    assert written["fault"] == "kill" and len(written["shards"]) == PARTITIONS
    assert [g["name"] for g in written["groups"]] == [survivors.name, failed.name]
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())
