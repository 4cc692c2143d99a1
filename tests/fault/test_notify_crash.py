"""kill -9 of `tally notify` mid-stream (#17): after a restart every event is delivered,
and the only repeats are deliveries the stored progress had not passed yet."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import msgspec
import pytest

from core.settings import Settings
from harness.procs import EngineProcess, IngressProcess, NotifyProcess
from ingress.client import Client
from sinks.migrate import migrate
from sinks.pg import quote
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

CRASH = {**NOTIFY, "notify_retry_horizon_s": 600}


async def stored_progress(settings: Settings, prefix: str, sub: str) -> dict[int, int]:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        rows = await conn.fetch(
            f"SELECT partition, next_offset FROM {quote(prefix)}.subscription_progress"
            " WHERE subscription_id = $1",
            sub,
        )
    finally:
        await conn.close()
    return {r["partition"]: r["next_offset"] for r in rows}


async def test_kill_9_of_the_notifier_loses_nothing_and_repeats_only_what_was_not_stored(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    prefix = f"ntc-{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp("notify-crash")
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
        settings, prefix=prefix, log_path=tmp / "notify2.log", partitions=PARTITIONS, **CRASH
    )
    receiver = Receiver("ok", delay_s=0.005)
    await receiver.start()
    await engine.start()
    try:
        await asyncio.gather(ingress.start(), first.start())
        async with Client(ingress.url, KEY_ID, SECRET) as client:
            sub = await subscribe(client, receiver.url, account_prefixes=[f"{prefix}-"])
            accounts = [f"{prefix}-{i}" for i in range(10)]
            ids = await deposits(client, accounts, 20, "a")
            await until(lambda: len(receiver.delivered()) >= 40, "deliveries under way")
            await first.kill()
            await asyncio.sleep(0.3)  # answers in flight at the kill reach the list
            at_kill = {b["delivery_id"] for b in receiver.acked}
            progress = await stored_progress(settings, prefix, sub)
            ids += await deposits(client, accounts, 10, "b")
            await second.start()
            await until(
                lambda: {b["command_id"] for b in receiver.acked} == set(ids),
                "every event delivered after the restart",
                120,
            )
    finally:
        await asyncio.gather(second.stop(), first.stop(), ingress.stop(), engine.stop())
        await receiver.stop()

    counts: dict[str, int] = {}
    for body in receiver.acked:
        counts[body["delivery_id"]] = counts.get(body["delivery_id"], 0) + 1
    repeated = [b for b in receiver.acked if counts[b["delivery_id"]] > 1]
    # Every repeat was delivered before the kill at an offset the stored progress had not
    # passed: nothing the notifier recorded as done was sent again.
    for body in repeated:
        assert body["delivery_id"] in at_kill
        assert body["offset"] >= progress.get(body["partition"], 0), body
    assert max(counts.values()) <= 2
    assert in_order_per_account(receiver.acked)
    print(
        f"delivered {len(counts)} events, {len(at_kill)} before the kill, "
        f"{len({b['delivery_id'] for b in repeated})} repeated"
    )
    assert msgspec.json.encode(progress)  # the notifier had stored progress before the kill
