"""Engine behaviour beyond one worker's happy path: the idempotency window, and several
workers sharing the shards with the table view routed to the owner."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from core.settings import Settings
from harness.collector import Collector
from harness.procs import EngineProcess, command, produce
from tests.waiting import until
from topics.schema import Deposit, Transfer

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
    try:
        await a.start()
        await b.start()
        await collector.start(from_end=False)
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


async def test_metrics_show_every_served_partition_caught_up_and_no_stall(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    """After a workload with transfers (so the internal topic carries transaction markers
    and credits), every served partition shows lag 0: markers are not records waiting,
    which a watchdog comparing offsets with the high watermark would take for a stall."""
    engine = EngineProcess(
        settings, prefix=f"met-{unique}", data_dir=tmp_path / "state", partitions=PARTITIONS
    )
    accounts = [f"met-{unique}-{i}" for i in range(8)]
    commands = [
        Deposit(command_id=f"d{i}", account=a, asset="USD", amount=100)
        for i, a in enumerate(accounts)
    ] + [
        Transfer(command_id=f"t{i}", account=a, to=accounts[(i + 3) % 8], asset="USD", amount=5)
        for i, a in enumerate(accounts)
    ]
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await engine.start()
    await collector.start(from_end=False)
    try:
        await produce(settings.kafka_bootstrap, engine.topics.commands.name,
                      [command(c) for c in commands])  # fmt: skip
        assert await collector.wait_for(
            lambda r: sum(len(v) for v in r.by_id.values()) >= 24, timeout_s=30, say=print
        )
        url = f"http://127.0.0.1:{engine.port}/metrics"
        async with aiohttp.ClientSession() as session:
            for _ in range(50):
                async with session.get(url) as response:
                    assert response.status == 200
                    text = await response.text()
                samples = {
                    line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line and not line.startswith("#")
                }
                lags = {
                    k: v for k, v in samples.items() if k.startswith("tally_engine_partition_lag")
                }
                if len(lags) == 2 * PARTITIONS and not any(lags.values()):
                    break
                await asyncio.sleep(0.2)
        assert len(lags) == 2 * PARTITIONS, text  # commands and internal, every shard
        assert not any(lags.values()), lags
        assert samples["tally_engine_ready"] == 1
        assert samples["tally_engine_stalled_partitions"] == 0
        assert samples["tally_engine_commit_wait_seconds_total"] >= 0
        assert samples['tally_engine_records_total{outcome="applied"}'] == 24
        assert samples['tally_engine_shards{state="serving"}'] == PARTITIONS
    finally:
        await collector.stop()
        await engine.stop()


async def _serving(worker: EngineProcess) -> set[int]:
    return set((await worker.readyz())["serving"])


async def _serves_all(worker: EngineProcess) -> bool:
    return await _serving(worker) == set(range(PARTITIONS))


async def _settled(a: EngineProcess, b: EngineProcess) -> tuple[set[int], set[int]]:
    async def split() -> bool:
        served = await _serving(a), await _serving(b)
        return all(served) and served[0] | served[1] == set(range(PARTITIONS))

    await until(split, timeout_s=30, what=lambda: f"shards not split:\n{a.tail()}\n{b.tail()}")
    return await _serving(a), await _serving(b)


async def test_a_rebalance_keeps_the_shards_that_stay_and_a_restart_moves_nothing(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    """Static membership and the sticky placement, seen from outside: a second worker
    joining takes half the shards and the first keeps the other half as they were (no
    fence, no catch-up); the second killed with SIGKILL and restarted from its data
    directory gets its own shards back with no rebalance at all (the first never hears
    of it); a clean stop hands its shards over; every command answered once."""
    prefix = f"keep-{unique}"
    a, b = (
        EngineProcess(settings, prefix=prefix, data_dir=tmp_path / n, partitions=PARTITIONS)
        for n in ("a", "b")
    )
    accounts = [f"keep-{unique}-{i}" for i in range(16)]
    collector = Collector(settings.kafka_bootstrap, a.topics)

    async def deposit(round_: int) -> None:
        ds = [
            Deposit(command_id=f"k{round_}-{x}", account=x, asset="USD", amount=1) for x in accounts
        ]
        await produce(settings.kafka_bootstrap, a.topics.commands.name, [command(d) for d in ds])
        assert await collector.wait_for(
            lambda r: all(d.command_id in r.by_id for d in ds), timeout_s=60, say=lambda _: None
        ), a.tail() + b.tail()

    try:
        await a.start()
        await collector.start(from_end=False)
        await deposit(0)
        first = (await a.readyz())["counts"]
        assert (first["assignments"], first["taken_shards"]) == (1, PARTITIONS)
        await b.start()
        served_a, served_b = await _settled(a, b)
        await deposit(1)
        joined = (await a.readyz())["counts"]
        # The first worker kept what it still serves and took nothing over again.
        assert joined["kept_shards"] == len(served_a) == PARTITIONS // 2
        assert joined["taken_shards"] == PARTITIONS
        # SIGKILL, and back within the session timeout under the same instance id.
        await b.kill()
        await b.start()
        assert await _serving(b) == served_b
        await deposit(2)
        after = (await a.readyz())["counts"]
        assert after["assignments"] == joined["assignments"], a.log_since_start()
        assert await _serving(a) == served_a
        # A clean stop leaves the group: the first worker takes every shard.
        assert await b.stop() == 0
        await until(
            lambda: _serves_all(a), timeout_s=30, what=lambda: f"not taken over:\n{a.tail()}"
        )
        await deposit(3)
        for account in accounts:
            assert (await a.balances(account))["USD"].available == 4
        statuses = [r.status.value for rs in collector.results.by_id.values() for r in rs]
        assert statuses.count("applied") == 4 * len(accounts) == len(statuses)
    finally:
        await collector.stop()
        await b.stop()
        await a.stop()


async def test_two_workers_under_one_instance_id_one_stops_and_says_why(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    """Two workers misconfigured with one TALLY_ENGINE_INSTANCE_ID expel each other at
    every join (Kafka takes the newest for the member): one of them must stop with a
    line naming the setting, and the other keep every shard and answer."""
    prefix = f"dup-{unique}"
    env = {"TALLY_ENGINE_INSTANCE_ID": f"same-{unique}"}
    a, b = (
        EngineProcess(
            settings, prefix=prefix, data_dir=tmp_path / n, partitions=PARTITIONS, extra_env=env
        )
        for n in ("a", "b")
    )
    collector = Collector(settings.kafka_bootstrap, a.topics)
    try:
        await a.start()
        await b.start(wait=False)
        await until(
            lambda: any(w.proc is not None and w.proc.returncode is not None for w in (a, b)),
            timeout_s=60,
            what=lambda: f"both still run:\n{a.tail()}\n{b.tail()}",
        )
        stopped, survivor = (a, b) if a.proc and a.proc.returncode is not None else (b, a)
        assert stopped.proc is not None and stopped.proc.returncode == 1
        assert "TALLY_ENGINE_INSTANCE_ID" in stopped.log_since_start()
        await survivor.wait_ready()
        await until(
            lambda: _serves_all(survivor),
            timeout_s=30,
            what=lambda: f"the survivor does not serve every shard:\n{survivor.tail()}",
        )
        d = Deposit(command_id=f"dup-{unique}", account=f"dup-{unique}", asset="USD", amount=5)
        await collector.start(from_end=False)
        await produce(settings.kafka_bootstrap, a.topics.commands.name, [command(d)])
        assert await _statuses(collector, d.command_id, 1) == ["applied"]
        assert survivor.proc is not None and survivor.proc.returncode is None
    finally:
        await collector.stop()
        await a.stop()
        await b.stop()
