"""kill -9 of `tally notify` mid-stream (#17): after a restart every event is delivered,
and the only repeats are the deliveries in flight at the kill: at most one per lane, the
last one each lane sent, however often progress is stored and however far a slow lane
holds a partition's progress back. The same after a clean stop (SIGTERM)."""

from __future__ import annotations

import asyncio
import collections
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from harness.procs import EngineProcess, IngressProcess, NotifyProcess
from ingress.client import Client
from notify import rules
from sinks.migrate import migrate
from tests.integration.test_notify import (
    KEY_ID,
    NOTIFY,
    PARTITIONS,
    SECRET,
    Receiver,
    deposits,
    in_order_per_account,
    subscribe,
    until,
)

LANES = 4
# No retries of a fast receiver's answers (a timeout would be a repeat of its own), and
# progress stored often: what a crash repeats must not hang on how often.
CRASH = {
    **NOTIFY,
    "notify_concurrency": LANES,
    "notify_timeout_ms": 10_000,
    "notify_retry_horizon_s": 600,
    "notify_progress_ms": 100,
}


def repeats_and_lasts(
    before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> tuple[set[str], dict[int, str]]:
    """The delivery ids the receiver got both before the kill and after the restart, and
    each lane's last request before the kill (the one it had in flight)."""
    last: dict[int, str] = {}
    for body in before:
        last[rules.lane_of(body["event"]["account"], LANES)] = body["delivery_id"]
    repeated = {b["delivery_id"] for b in before} & {b["delivery_id"] for b in after}
    return repeated, last


@dataclass
class Runs:
    ids: list[str]  # every command the receiver must have had acknowledged
    before: list[dict[str, Any]]  # requests it got before the notifier's end
    after: list[dict[str, Any]]  # and after the restart
    acked: list[dict[str, Any]]


async def crash_and_restart(
    settings: Settings, tmp: Path, *, how: str, lanes_after: int = LANES
) -> Runs:
    """A notifier delivers to a receiver with one slow account (its lane holds its
    partition's watermark far back), is killed (or stopped) mid-stream, and a second one
    with `lanes_after` lanes delivers the rest."""
    prefix = f"ntc-{uuid.uuid4().hex[:8]}"
    await migrate(settings.pg_dsn, prefix, PARTITIONS)
    engine = EngineProcess(settings, prefix=prefix, data_dir=tmp / "engine", partitions=PARTITIONS)
    ingress = IngressProcess(
        settings, prefix=prefix, log_path=tmp / "ingress.log", partitions=PARTITIONS,
        keys={KEY_ID: SECRET}, notify_allow_private=True,
    )  # fmt: skip
    first = NotifyProcess(
        settings, prefix=prefix, log_path=tmp / "notify1.log", partitions=PARTITIONS, **CRASH
    )
    second = NotifyProcess(
        settings, prefix=prefix, log_path=tmp / "notify2.log", partitions=PARTITIONS,
        **{**CRASH, "notify_concurrency": lanes_after},
    )  # fmt: skip
    accounts = [f"{prefix}-{i}" for i in range(20)]
    receiver = Receiver("ok", delay_s=0.01, slow={accounts[0]: 0.15})
    await receiver.start()
    await engine.start()
    try:
        await asyncio.gather(ingress.start(), first.start())
        async with Client(ingress.url, KEY_ID, SECRET) as client:
            await subscribe(client, receiver.url, account_prefixes=[f"{prefix}-"])
            ids = await deposits(client, accounts, 30, "a")
            await until(lambda: len(receiver.acked) >= 150, "deliveries under way")
            await (first.kill() if how == "kill" else first.stop())
            await asyncio.sleep(0.5)  # requests sent before the kill reach the list
            before = list(receiver.requests)
            assert len({b["command_id"] for b in before}) < len(ids), "killed mid-stream"
            ids += await deposits(client, accounts, 5, "b")
            await second.start()
            await until(
                lambda: {b["command_id"] for b in receiver.acked} == set(ids),
                "every event delivered after the restart",
                120,
            )
    finally:
        await asyncio.gather(second.stop(), first.stop(), ingress.stop(), engine.stop())
        await receiver.stop()
    return Runs(ids, before, receiver.requests[len(before) :], receiver.acked)


@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_kill_9_of_the_notifier_repeats_only_the_deliveries_in_flight(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, how: str
) -> None:
    runs = await crash_and_restart(settings, tmp_path_factory.mktemp("notify-crash"), how=how)
    repeated, last = repeats_and_lasts(runs.before, runs.after)
    in_flight = set(last.values())
    print(
        f"{len(runs.before)} requests before the {how}, {len(runs.after)} after the restart, "
        f"{len(repeated)} repeated (in flight: at most {len(in_flight)}): {sorted(repeated)}"
    )
    # A repeat is a delivery some lane had in flight at the kill, nothing it had done.
    assert repeated <= in_flight, sorted(repeated - in_flight)
    assert len(repeated) <= LANES
    # Each delivery once per notifier run (no retry of a receiver answering 200).
    for run in (runs.before, runs.after):
        counts = collections.Counter(b["delivery_id"] for b in run)
        assert max(counts.values()) == 1
    assert {b["command_id"] for b in runs.acked} == set(runs.ids)  # nothing lost
    assert in_order_per_account(runs.acked)


async def test_a_restart_with_another_lane_count_loses_nothing(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The stored lanes' offsets are of 4 lanes; a notifier with 3 maps accounts to lanes
    otherwise and must not skip by them (it repeats more: from the watermark)."""
    tmp = tmp_path_factory.mktemp("notify-relane")
    runs = await crash_and_restart(settings, tmp, how="kill", lanes_after=3)
    repeated, _ = repeats_and_lasts(runs.before, runs.after)
    print(f"{len(runs.before)} requests before the kill, {len(repeated)} repeated")
    assert {b["command_id"] for b in runs.acked} == set(runs.ids)  # nothing lost
    assert in_order_per_account(runs.acked)
    counts = collections.Counter(b["delivery_id"] for b in runs.acked)
    assert max(counts.values()) <= 2
