"""`tally chaos` in one call: the fault kinds and count from the options, the fault plan
said before the run, the run, and the deployment cleaned up after it (unless kept)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from core.logs import setup_logging
from core.settings import Settings
from harness import cluster
from harness.chaos import KINDS, ChaosError, Harness, Run, render
from harness.chaos.plan import CLUSTER_KINDS
from harness.faults import FaultUnavailable

# Without a count given: one fault per this many seconds of load, and at least
# faults_min (each kind once before any repeats).
seconds_per_fault = 25
faults_min = 3


def kinds_of(text: str | None, settings: Settings) -> list[str]:
    """The comma-separated fault kinds, or without any given every kind these settings
    can take (the cluster kinds when the run is on a cluster); ValueError names unknown
    ones, and cluster kinds asked for without their cluster."""
    usable = [*KINDS, *cluster.usable_kinds(settings)]
    if text is None:
        return usable
    picked = [k.strip() for k in text.split(",") if k.strip()]
    unknown = sorted(set(picked) - set(KINDS) - set(CLUSTER_KINDS))
    if unknown or not picked:
        raise ValueError(f"unknown {unknown}; choose from {', '.join(KINDS + CLUSTER_KINDS)}")
    off = sorted(set(picked) - set(usable))
    if off:
        raise ValueError(
            f"{', '.join(off)} need the local cluster they break (the three-broker Kafka"
            " cluster in TALLY_KAFKA_BOOTSTRAP, the Redis Cluster with TALLY_REDIS_CLUSTER)"
        )
    return picked


def faults_for(duration_s: int, faults_count: int | None) -> int:
    """How many faults a run of `duration_s` seconds gets (the count given, if any)."""
    if faults_count is not None:
        return faults_count
    return max(faults_min, duration_s // seconds_per_fault)


def run(
    settings: Settings,
    *,
    seed: int,
    duration_s: int,
    faults_count: int,
    kinds: list[str],
    workers: int,
    rate: int,
    accounts: int,
    redis_db: int,
    keep: bool,
    work_dir: Path,
    say: Callable[[str], None],
) -> Run:
    """Carry out one chaos run and return it (`render` prints it, `ok` sums it up).
    Raises ChaosError when it could not be carried out, after saying how far it got."""
    setup_logging(settings, "chaos", quiet=True)
    # The harness breaks the broker on purpose: aiokafka's reconnect chatter is expected.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    harness = Harness(
        settings,
        seed=seed,
        duration_s=duration_s,
        faults_count=faults_count,
        kinds=kinds,
        workers=workers,
        rate=rate,
        accounts=accounts,
        redis_db=redis_db,
        work_dir=work_dir,
        say=say,
    )
    say("fault plan:")
    for fault in harness.run.plan:
        say(f"  {fault.line()}")

    async def go() -> Run:
        try:
            return await harness.execute()
        finally:
            if not keep:
                await harness.clean()

    try:
        return asyncio.run(go())
    except (ChaosError, FaultUnavailable) as exc:
        say(render(harness.run))
        raise ChaosError(f"could not run (seed {seed}): {exc}") from exc
