"""kill -9 of an engine worker in the middle of a workload, then a restart: every record
still gets exactly one result, no balance skips or repeats a seq, and money is conserved.

This is the exactly-once claim under the crash that breaks naive designs: the worker dies
with table writes, result events and offsets of an open transaction in flight."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from core.settings import Settings
from harness import checks
from harness.collector import Collector, all_answered, expected_counts
from harness.procs import EngineProcess, trickle
from harness.workload import build
from streams.state import BalanceState

pytestmark = pytest.mark.fault


@pytest.mark.parametrize("seed", [11])
async def test_kill_9_mid_stream_then_restart(
    settings: Settings, unique: str, tmp_path: Path, seed: int
) -> None:
    engine = EngineProcess(settings, prefix=f"fault-{unique}", data_dir=tmp_path / "state")
    work = build(count=4000, accounts=300, seed=seed, now_ms=int(time.time() * 1000))
    expected = expected_counts(r.command_id for r in work.records)
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    producing: asyncio.Task[None] | None = None
    try:
        await engine.start()
        await collector.start(from_end=False)
        producing = asyncio.create_task(
            trickle(
                settings.kafka_bootstrap,
                engine.topics.commands.name,
                [(r.key, r.value, None) for r in work.records],
            )
        )
        third = sum(expected.values()) // 3
        assert await collector.wait_for(
            lambda r: r.count >= third, timeout_s=120, say=lambda _: None
        ), engine.tail()
        assert await engine.kill() != 0
        # Mid-stream: commands were still arriving and unanswered when it died.
        assert not producing.done() and not all_answered(expected)(collector.results)
        await engine.start()
        await producing
        done = all_answered(expected)
        drained = await collector.wait_for(
            lambda r: done(r) and not r.pending_internal() and time.monotonic() - r.last_at > 3,
            timeout_s=180,
            say=lambda _: None,
        )
        accounts = {r.key for r in work.records} | {
            e.account
            for group in collector.results.by_id.values()
            for x in group
            for e in x.entries
        }
        balances: dict[tuple[str, str], BalanceState] = {}
        for account in sorted(accounts):
            for asset, bal in (await engine.balances(account)).items():
                balances[(account, asset)] = bal
        found = checks.run_checks(
            expected=expected,
            garbage=work.garbage,
            results=collector.results,
            balances=balances,
        )
    finally:
        if producing is not None:
            producing.cancel()
        await collector.stop()
        await engine.stop()
    assert drained and all(c.ok for c in found), checks.render(found)
