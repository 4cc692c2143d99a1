"""Engine state rebuilt from the changelog: a deleted state directory, a truncated .sst,
/readyz held at 503 until recovery is done, and a standby replica that takes a shard
over without replaying its whole changelog."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from bench import recovery as bench_recovery
from core.settings import Settings
from harness.collector import Collector, all_answered, expected_counts, read_all
from harness.procs import EngineError, EngineProcess, command, produce
from harness.workload import Workload, build
from streams.state import BalanceState
from topics.schema import Deposit

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]


async def _apply(engine: EngineProcess, settings: Settings, work: Workload) -> None:
    """Produce the workload and wait until every command, credit and refund is answered."""
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await collector.start(from_end=False)
    try:
        await produce(settings.kafka_bootstrap, engine.topics.commands.name,
                      [(r.key, r.value, None) for r in work.records])  # fmt: skip
        done = all_answered(expected_counts(r.command_id for r in work.records))
        assert await collector.wait_for(
            lambda r: done(r) and not r.pending_internal() and time.monotonic() - r.last_at > 2,
            timeout_s=120,
            say=lambda _: None,
        ), engine.tail()
    finally:
        await collector.stop()


async def _balances(
    engine: EngineProcess, accounts: list[str]
) -> dict[tuple[str, str], BalanceState]:
    out = {}
    for account in accounts:
        for asset, bal in (await engine.balances(account)).items():
            out[(account, asset)] = bal
    return out


def _work(seed: int) -> tuple[Workload, list[str]]:
    work = build(count=1500, accounts=120, seed=seed, now_ms=int(time.time() * 1000),
                 expiring_holds=False)  # fmt: skip
    return work, sorted({r.key for r in work.records})


async def test_deleted_state_directory_is_rebuilt_with_identical_balances(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    engine = EngineProcess(settings, prefix=f"rec-{unique}", data_dir=tmp_path / "state")
    await engine.start()
    try:
        work, accounts = _work(21)
        await _apply(engine, settings, work)
        before = await _balances(engine, accounts)
        assert len(before) > 100
        await engine.stop()
        shutil.rmtree(engine.data_dir)
        await engine.start()
        assert await _balances(engine, accounts) == before
        counts = (await engine.readyz())["counts"]
        assert counts["recovered_records"] > len(before), counts
    finally:
        await engine.stop()


async def test_truncated_sst_is_thrown_away_and_rebuilt(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    engine = EngineProcess(settings, prefix=f"sst-{unique}", data_dir=tmp_path / "state")
    await engine.start()
    try:
        work, accounts = _work(22)
        await _apply(engine, settings, work)
        before = await _balances(engine, accounts)
        assert len(before) > 100, before  # an empty read would equal an empty read
        await engine.stop()  # a clean stop flushes every shard to .sst files
        ssts = sorted(engine.data_dir.glob("shard-*/*.sst"), key=lambda p: p.stat().st_size)
        assert ssts, list(engine.data_dir.rglob("*"))
        victim = ssts[-1]
        with victim.open("r+b") as f:
            f.truncate(victim.stat().st_size // 2)
        await engine.start()
        assert await _balances(engine, accounts) == before
        counts = (await engine.readyz())["counts"]
        assert counts["rebuilt_shards"] == 1, counts
        assert "local state unreadable" in engine.tail(400)
    finally:
        await engine.stop()


async def test_readyz_is_503_until_recovery_is_complete(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    prefix = f"rdy-{unique}"
    local = msgspec.structs.replace(settings, topic_prefix=prefix, partitions=4)
    n = 150_000
    await bench_recovery.seed(local, f"{prefix}-engine", n)
    engine = EngineProcess(settings, prefix=prefix, data_dir=tmp_path / "state", partitions=4)
    seen: list[tuple[int, list[int]]] = []
    first_ready: dict[str, Any] = {}
    await engine.start(wait=False)
    try:
        url = f"http://127.0.0.1:{engine.port}/readyz"
        deadline = time.monotonic() + 120
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(url) as response:
                        body = await response.json()
                        seen.append((response.status, body["recovering"]))
                        if response.status == 200:
                            first_ready = body
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        assert seen and seen[-1][0] == 200, seen[-5:]
        assert any(status == 503 and recovering for status, recovering in seen), seen[:5]
        assert all(recovering == [] for status, recovering in seen if status == 200)
        # The first 200 is the end of recovery, not a step of it: by then every shard is
        # served and every record the seed wrote (an account record and a balance per
        # account) has been read, and balances from every part of the changelog are there.
        assert first_ready["serving"] == [0, 1, 2, 3], first_ready
        assert first_ready["counts"]["recovered_records"] == 2 * n, first_ready
        for i in (0, 1, 2, 3, *range(7, n, n // 40), n - 2, n - 1):
            got = (await engine.balances(bench_recovery.account_of(i))).get("USD")
            want = bench_recovery.balance_of(i)
            assert got is not None, f"account {i} missing after the first 200"
            assert (got.available, got.held, got.seq) == (want.available, want.held, want.seq)
    finally:
        await engine.stop()


async def test_standby_replica_takes_over_without_replaying_the_changelog(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    prefix = f"sby-{unique}"
    standby = {"TALLY_TABLE_STANDBY_REPLICAS": "1"}
    a = EngineProcess(settings, prefix=prefix, data_dir=tmp_path / "a", extra_env=standby)
    b = EngineProcess(settings, prefix=prefix, data_dir=tmp_path / "b", extra_env=standby)
    try:
        await a.start()
        await b.start()
        work, accounts = _work(23)
        await _apply(a, settings, work)

        async def split() -> tuple[list[int], list[int]]:
            return (await a.readyz())["serving"], (await b.readyz())["serving"]

        owned_a, owned_b = await split()
        assert owned_a and owned_b, (owned_a, owned_b)
        before = await _balances(b, accounts)
        assert len(before) > 100, before  # an empty read would equal an empty read
        # b's standby copies of a's shards have caught up once it has tailed as many
        # changelog records as a wrote for them; give it a moment.
        deadline = time.monotonic() + 30
        while (await b.readyz())["counts"]["standby_records"] == 0:
            assert time.monotonic() < deadline, b.tail()
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        standby_before = (await b.readyz())["counts"]["standby_records"]
        assert await a.kill() != 0
        deadline = time.monotonic() + 90
        while sorted((await b.readyz())["serving"]) != list(range(4)):
            assert time.monotonic() < deadline, b.tail()
            await asyncio.sleep(0.2)
        counts = (await b.readyz())["counts"]
        # Taking a's shards over read (almost) nothing: the standby copy had it all.
        assert counts["recovered_records"] < standby_before // 10, counts
        assert await _balances(b, accounts) == before
    finally:
        await a.stop()
        await b.stop()


async def _compact_quickly(bootstrap: str, topic: str) -> None:
    """Make the broker's cleaner compact `topic` within seconds: short segments, and any
    dirty share at all is worth cleaning."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(
            ConfigResourceType.TOPIC, topic,
            {"segment.ms": "300", "min.cleanable.dirty.ratio": "0.001",
             "cleanup.policy": "compact", "retention.ms": "-1"},
        )])  # fmt: skip
    finally:
        await admin.close()


async def test_recovery_reads_a_compacted_changelog_with_gaps_and_markers_to_its_end(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    """The recovery hang faust-streaming users met (#176, #597): a compacted changelog has
    offsets with no record (cleaned away) and transaction markers, so a restore that waits
    to *see* the record at end-1 never ends. Ours ends on the consumer's position."""
    from topics.names import changelog_name

    prefix = f"cmp-{unique}"
    engine = EngineProcess(settings, prefix=prefix, data_dir=tmp_path / "state", partitions=2)
    await engine.start()
    changelog = changelog_name(f"{prefix}-engine")
    try:
        await _compact_quickly(settings.kafka_bootstrap, changelog)
        accounts = [f"cmp-{unique}-{i}" for i in range(6)]
        sent = 0
        for round_ in range(12):  # many transactions over the same keys, segments rolling
            work = [Deposit(command_id=f"d{round_}-{i}", account=a, asset="USD", amount=1)
                    for i, a in enumerate(accounts)]  # fmt: skip
            await produce(settings.kafka_bootstrap, engine.topics.commands.name,
                          [command(d) for d in work])  # fmt: skip
            sent += len(work)
            await asyncio.sleep(0.5)
        deadline = time.monotonic() + 90
        while True:
            balances = await _balances(engine, accounts)
            if all(b.seq == 12 for b in balances.values()) and len(balances) == 6:
                break
            assert time.monotonic() < deadline, balances
            await asyncio.sleep(0.5)
        while True:  # the cleaner runs every few seconds
            read, ends = await read_all(settings.kafka_bootstrap, changelog, 2)
            records, end = len(read), sum(ends.values())
            # Each deposit wrote its balance (a round's idempotency records went as one
            # group record per shard); the balances of the six accounts were
            # overwritten eleven times, which compaction drops.
            if records < sent * 3 // 4:
                break
            assert time.monotonic() < deadline, f"never compacted: {records} of {end}"
            await asyncio.sleep(1)
        await engine.stop()
        shutil.rmtree(engine.data_dir)
        try:
            await engine.start()  # gives up, with the log, after procs.ready_timeout_s
        except EngineError as e:
            pytest.fail(f"recovery never reached the end of the compacted changelog: {e}")
        assert await _balances(engine, accounts) == balances
        counts = (await engine.readyz())["counts"]
        assert counts["recovered_records"] == records < end, (counts, records, end)
    finally:
        await engine.stop()


async def test_a_take_over_longer_than_the_session_timeout_keeps_the_worker_in_the_group(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    """aiokafka sends no heartbeat while a rebalance callback runs, so a take-over done in
    the callback and longer than the session timeout had the group expel the worker, give
    it the shards again, and so on. Here the take-over of shard 0 waits for a transaction
    left open on its changelog partition (a stuck previous owner's, aborted by its
    coordinator after its transaction timeout, longer than the session timeout): the
    worker must stay the member it joined as (one assignment) through that wait and
    serve every shard after it, the others meanwhile."""
    from streams import engine as engine_module
    from topics.names import changelog_name
    from topics.producer import durable_producer

    prefix = f"slow-{unique}"
    local = msgspec.structs.replace(settings, topic_prefix=prefix, partitions=2)
    app_id = f"{prefix}-engine"
    await bench_recovery.seed(local, app_id, 200)
    stuck_for_s = engine_module.session_timeout_ms / 1000 + 6
    stuck = durable_producer(
        settings.kafka_bootstrap,
        transactional_id=f"{prefix}-stuck",
        transaction_timeout_ms=int(stuck_for_s * 1000),
    )
    await stuck.start()
    engine = EngineProcess(settings, prefix=prefix, data_dir=tmp_path / "state", partitions=2)
    try:
        await stuck.begin_transaction()
        await stuck.send_and_wait(
            changelog_name(app_id), key=b"stuck", value=b"never committed", partition=0
        )
        opened = time.monotonic()
        await engine.start(wait=False)
        url = f"http://127.0.0.1:{engine.port}/readyz"
        serving_while_stuck: list[list[int]] = []
        ready: dict[str, Any] = {}
        async with aiohttp.ClientSession() as session:
            while time.monotonic() - opened < stuck_for_s + 60:
                try:
                    async with session.get(url) as response:
                        body = await response.json()
                except aiohttp.ClientError:
                    await asyncio.sleep(0.2)
                    continue
                if response.status == 200:
                    ready = body
                    break
                if body["recovering"] == [0]:
                    serving_while_stuck.append(body["serving"])
                await asyncio.sleep(0.2)
        waited_s = time.monotonic() - opened
        assert ready, engine.tail()
        assert waited_s > engine_module.session_timeout_ms / 1000, waited_s  # the case
        assert [1] in serving_while_stuck, serving_while_stuck[-5:]
        await asyncio.sleep(3 * engine_module.heartbeat_interval_ms / 1000)
        body = await engine.readyz()
        assert body["serving"] == [0, 1], body
        assert body["counts"]["assignments"] == 1, (body["counts"], engine.tail(200))
        for i in (0, 1, 2, 199):
            got = (await engine.balances(bench_recovery.account_of(i))).get("USD")
            assert got is not None and got.available == bench_recovery.balance_of(i).available
    finally:
        await engine.stop()
        with contextlib.suppress(Exception):
            await stuck.stop()
