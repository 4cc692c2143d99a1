"""Engine behaviour beyond one worker's happy path: the idempotency window, and several
workers sharing the shards with the table view routed to the owner."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tally.collector import Collector
from tally.procs import EngineProcess, command, produce
from tally.settings import Settings
from topics.schema import Deposit

PARTITIONS = 4


async def _statuses(collector: Collector, command_id: str, n: int) -> list[str]:
    assert await collector.wait_for(
        lambda r: len(r.by_id.get(command_id, [])) >= n, timeout_s=30, say=lambda _: None
    )
    return [r.status.value for r in collector.results.by_id[command_id]]


async def test_command_ids_are_forgotten_after_the_retention(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    engine = EngineProcess(
        settings,
        prefix=f"ret-{unique}",
        data_dir=tmp_path / "state",
        partitions=PARTITIONS,
        extra_env={"TALLY_IDEMPOTENCY_RETENTION_S": "4"},
    )
    account = f"ret-{unique}"
    deposit = Deposit(command_id=f"r1-{unique}", account=account, asset="USD", amount=100)
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await engine.start()
    await collector.start(from_end=False)
    try:
        await produce(settings.kafka_bootstrap, engine.topics.commands.name, [command(deposit)])
        assert await _statuses(collector, deposit.command_id, 1) == ["applied"]
        # Within the window: a repeat is a duplicate.
        await produce(settings.kafka_bootstrap, engine.topics.commands.name, [command(deposit)])
        assert await _statuses(collector, deposit.command_id, 2) == ["applied", "duplicate"]
        for _ in range(150):
            if (await engine.readyz())["counts"].get("pruned", 0) >= 1:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the record was not pruned:\n{engine.tail()}")
        # After it: the id is new again, and applies.
        await produce(settings.kafka_bootstrap, engine.topics.commands.name, [command(deposit)])
        assert await _statuses(collector, deposit.command_id, 3) == [
            "applied",
            "duplicate",
            "applied",
        ]
        assert (await engine.balances(account))["USD"].available == 200
    finally:
        await collector.stop()
        await engine.stop()


async def test_two_workers_share_the_shards_and_route_the_view(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    prefix = f"pair-{unique}"
    a, b = (
        EngineProcess(settings, prefix=prefix, data_dir=tmp_path / n, partitions=PARTITIONS)
        for n in ("a", "b")
    )
    accounts = [f"pair-{unique}-{i}" for i in range(16)]
    deposits = [
        Deposit(command_id=f"d-{x}", account=x, asset="USD", amount=10 + i)
        for i, x in enumerate(accounts)
    ]
    collector = Collector(settings.kafka_bootstrap, a.topics)
    await a.start()
    await b.start()
    await collector.start(from_end=False)
    try:
        # Both members hold shards once the group has settled on two members.
        for _ in range(300):
            served = [set((await w.readyz())["serving"]) for w in (a, b)]
            if all(served) and served[0] | served[1] == set(range(PARTITIONS)):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"shards not split: {served}\n{a.tail()}\n{b.tail()}")
        assert not served[0] & served[1]
        await produce(
            settings.kafka_bootstrap, a.topics.commands.name, [command(d) for d in deposits]
        )
        assert await collector.wait_for(
            lambda r: all(d.command_id in r.by_id for d in deposits),
            timeout_s=60,
            say=lambda _: None,
        ), a.tail() + b.tail()
        # Every account answers the same from either worker: one owns it, the other
        # forwards the request to the owner.
        for i, account in enumerate(accounts):
            from_a, from_b = await a.balances(account), await b.balances(account)
            assert from_a == from_b
            assert (from_a["USD"].available, from_a["USD"].seq) == (10 + i, 1)
        # The second worker leaves: the first takes every shard over and still answers.
        assert await b.stop() == 0
        for _ in range(300):
            if set((await a.readyz())["serving"]) == set(range(PARTITIONS)):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"shards not taken over:\n{a.tail()}")
        for i, account in enumerate(accounts):
            assert (await a.balances(account))["USD"].available == 10 + i
    finally:
        await collector.stop()
        await b.stop()
        await a.stop()
