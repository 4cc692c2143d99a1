"""The chaos harness, short form: two engine workers in one group under a seeded load,
a worker killed with kill -9, a worker paused past its session timeout (a zombie that
must be fenced) and the Kafka broker restarted; afterwards nothing lost, nothing doubled,
and every store agrees. `make chaos` runs the long form; TALLY_CHAOS_SEED picks another
seed here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tally import chaos, faults
from tally.settings import Settings

pytestmark = [pytest.mark.fault, pytest.mark.timeout(420)]


async def test_short_chaos_run_loses_and_doubles_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    try:
        faults.broker()
    except faults.FaultUnavailable as exc:
        pytest.skip(str(exc))
    seed = int(os.environ.get("TALLY_CHAOS_SEED", "1"))
    harness = chaos.Harness(
        settings,
        seed=seed,
        duration_s=50,
        faults_count=len(chaos.SHORT_KINDS),
        kinds=chaos.SHORT_KINDS,
        workers=2,
        work_dir=tmp_path,
        say=print,
    )
    try:
        run = await harness.execute()
    except chaos.ChaosError as exc:
        pytest.fail(f"the chaos run could not finish: {exc}\n{chaos.render(harness.run)}")
    finally:
        await harness.clean()
    report = chaos.render(run)
    print(report)
    assert [f.kind for f in run.plan] and {f.kind for f in run.plan} == set(chaos.SHORT_KINDS)
    assert run.produced == 50 * 300
    assert run.ok, report
