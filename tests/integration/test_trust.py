"""What a producer may not choose: the engine's time (record timestamps stamped by the
producer change no decision), and one worker's settings (a worker that disagrees with
its group takes no shard). Real broker, real worker processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from core.settings import Settings
from harness.collector import Collector, read_all
from harness.procs import EngineProcess, command, produce
from streams.engine import Engine
from topics.admin import ensure_topics, topic_configs
from topics.codec import encode
from topics.producer import durable_producer
from topics.schema import (
    Capture,
    Command,
    Configure,
    Deposit,
    Disburse,
    Hold,
    Leg,
    Release,
    Result,
    Transfer,
    Withdraw,
)
from topics.specs import topics_for

PARTITIONS = 4
YEAR_MS = 365 * 24 * 3600 * 1000
PROBE = b"probe: not a command"


async def _produce_stamped(bootstrap: str, topic: str, stamped: list[tuple[Command, int]]) -> None:
    """Each command with the record timestamp its producer chose (CreateTime)."""
    producer = durable_producer(bootstrap)
    await producer.start()
    try:
        for c, timestamp_ms in stamped:
            await producer.send_and_wait(
                topic, encode(c), key=c.account.encode(), timestamp_ms=timestamp_ms
            )
    finally:
        await producer.stop()


async def _set_timestamp_type(bootstrap: str, topic: str, kind: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"message.timestamp.type": kind})]
        )
    finally:
        await admin.close()
    # The controller takes it before the partition leaders apply it: wait until a probe
    # record (the engine dead-letters it) keeps its producer's stamp.
    producer = durable_producer(bootstrap)
    await producer.start()
    try:
        for _ in range(100):
            sent = await producer.send_and_wait(topic, PROBE, partition=0, timestamp_ms=1)
            if (sent.timestamp == 1) == (kind == "CreateTime"):
                return
            await asyncio.sleep(0.1)
    finally:
        await producer.stop()
    raise AssertionError(f"{topic} did not take message.timestamp.type={kind}")


async def _results(collector: Collector, command_id: str, n: int) -> list[Result]:
    assert await collector.wait_for(
        lambda r: len(r.by_id.get(command_id, [])) >= n, timeout_s=30, say=lambda _: None
    ), f"{command_id}: fewer than {n} results"
    return collector.results.by_id[command_id]


async def _statuses(collector: Collector, command_id: str, n: int) -> list[str]:
    found = await _results(collector, command_id, n)
    return [f"{r.status.value}{'' if r.reason is None else ':' + r.reason.value}" for r in found]


async def test_producer_stamped_times_change_no_decision(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    """Past, future and absurd record timestamps on every command kind: the results are
    stamped with the engine's time, a hold whose expiry has passed in real time is
    refused, a capture of a live hold applies, and a withdraw stamped three years ago is
    still remembered after several pruning passes (retention 1 h: a pass every 0.9 s)."""
    engine = EngineProcess(
        settings,
        prefix=f"clock-{unique}",
        data_dir=tmp_path / "state",
        partitions=PARTITIONS,
        extra_env={"TALLY_IDEMPOTENCY_RETENTION_S": "3600"},
    )
    a, b = f"clock-{unique}-a", f"clock-{unique}-b"
    now = int(time.time() * 1000)
    past, future, absurd = now - 3 * YEAR_MS, now + YEAR_MS, 253_402_300_800_000 + YEAR_MS
    withdraw = Withdraw(command_id=f"w-{unique}", account=a, asset="USD", amount=10)
    stamped: list[tuple[Command, int]] = [
        (Deposit(command_id=f"d-{unique}", account=a, asset="USD", amount=1000), absurd),
        (withdraw, past),
        (Transfer(command_id=f"t-{unique}", account=a, to=b, asset="USD", amount=5), future),
        (
            Disburse(command_id=f"s-{unique}", account=a, asset="USD", legs=[Leg(to=b, amount=5)]),
            0,
        ),
        (Configure(command_id=f"c-{unique}", account=b, asset="USD", overdraft_limit=0), past),
        # Expired a second ago in real time, stamped an hour earlier: must be refused.
        (
            Hold(
                command_id=f"h1-{unique}",
                account=a,
                hold_id="h1",
                asset="USD",
                amount=7,
                expires_at_ms=now - 1000,
            ),
            now - 3600_000,
        ),
        (Capture(command_id=f"k1-{unique}", account=a, hold_id="h1"), past),
        # Live for an hour, the capture stamped a year ahead: must apply.
        (
            Hold(
                command_id=f"h2-{unique}",
                account=a,
                hold_id="h2",
                asset="USD",
                amount=9,
                expires_at_ms=now + 3600_000,
            ),
            past,
        ),
        (Capture(command_id=f"k2-{unique}", account=a, hold_id="h2"), future),
        (
            Hold(command_id=f"h3-{unique}", account=a, hold_id="h3", asset="USD", amount=3),
            absurd,
        ),
        (Release(command_id=f"r3-{unique}", account=a, hold_id="h3"), past),
        # An expiry past the year 9999 is no time: refused as invalid.
        (
            Hold(
                command_id=f"h4-{unique}",
                account=a,
                hold_id="h4",
                asset="USD",
                amount=1,
                expires_at_ms=absurd,
            ),
            now,
        ),
    ]
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await engine.start()
    await collector.start(from_end=False)
    try:
        # The engine's rule holds on its own: with the commands topic put back to
        # CreateTime (an operator's edit), the records carry the producers' stamps.
        await _set_timestamp_type(
            settings.kafka_bootstrap, engine.topics.commands.name, "CreateTime"
        )
        before = int(time.time() * 1000)
        await _produce_stamped(settings.kafka_bootstrap, engine.topics.commands.name, stamped)
        for c, _ in stamped:
            (result,) = await _results(collector, c.command_id, 1)
            after = int(time.time() * 1000)
            assert before <= result.at_ms <= after, (c, result)
        outcomes = {
            c.command_id: (await _statuses(collector, c.command_id, 1))[0] for c, _ in stamped
        }
        assert outcomes == {
            f"d-{unique}": "applied",
            f"w-{unique}": "applied",
            f"t-{unique}": "applied",
            f"s-{unique}": "applied",
            f"c-{unique}": "applied",
            f"h1-{unique}": "rejected:hold_expired",
            f"k1-{unique}": "rejected:hold_not_found",
            f"h2-{unique}": "applied",
            f"k2-{unique}": "applied",
            f"h3-{unique}": "applied",
            f"r3-{unique}": "applied",
            f"h4-{unique}": "rejected:invalid_command",
        }
        # Several pruning passes later, the withdraw stamped three years ago is still
        # remembered: its retry is a duplicate, not a second withdrawal.
        await asyncio.sleep(4)
        await _produce_stamped(
            settings.kafka_bootstrap, engine.topics.commands.name, [(withdraw, past)]
        )
        assert await _statuses(collector, withdraw.command_id, 2) == ["applied", "duplicate"]
        assert (await engine.balances(a))["USD"].available == 1000 - 10 - 5 - 5 - 9
        assert (await engine.readyz())["counts"].get("pruned", 0) == 0
        records, _ = await read_all(
            settings.kafka_bootstrap, engine.topics.commands.name, PARTITIONS
        )
        assert sorted(r.timestamp for r in records if r.value != PROBE) == sorted(
            t for _, t in [*stamped, (withdraw, past)]
        )
        # After a restart (whose start-up puts the topic back to LogAppendTime), the
        # times recorded are the engine's still: still a duplicate.
        await engine.stop()
        await engine.start()
        await _produce_stamped(
            settings.kafka_bootstrap, engine.topics.commands.name, [(withdraw, past)]
        )
        assert await _statuses(collector, withdraw.command_id, 3) == [
            "applied",
            "duplicate",
            "duplicate",
        ]
        assert (await engine.balances(a))["USD"].available == 1000 - 10 - 5 - 5 - 9
    finally:
        await collector.stop()
        await engine.stop()


async def test_existing_topics_are_moved_to_broker_time(settings: Settings, unique: str) -> None:
    """Topics created before this rule (CreateTime, an operator's retention) are altered
    to LogAppendTime by the start-up that ensures them, their other settings kept."""
    topics = topics_for(f"mig-{unique}", 2)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    spec.name,
                    num_partitions=2,
                    replication_factor=1,
                    topic_configs={"message.timestamp.type": "CreateTime", "retention.ms": "12345"},
                )
                for spec in topics.all()
            ]
        )
        await ensure_topics(settings.kafka_bootstrap, topics.all())
        configs = await topic_configs(admin, [spec.name for spec in topics.all()])
        for spec in topics.all():
            assert configs[spec.name]["message.timestamp.type"] == "LogAppendTime", spec.name
            assert configs[spec.name]["retention.ms"] == "12345", spec.name
        # The broker stamps records now, whatever the producer says.
        stamped = Deposit(command_id="x", account="x", asset="USD", amount=1)
        await _produce_stamped(settings.kafka_bootstrap, topics.commands.name, [(stamped, 0)])
        records, _ = await read_all(settings.kafka_bootstrap, topics.commands.name, 2)
        (record,) = records
        assert record.timestamp_type == 1 and record.timestamp > 1_700_000_000_000
    finally:
        await admin.close()


async def test_a_worker_with_other_settings_takes_no_shard(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    """A second worker with TALLY_IDEMPOTENCY_RETENTION_S=1 joins the group: it is
    refused (exits non-zero naming the setting and both values), the first keeps every
    shard, and exact retries of the commands applied before it joined stay duplicates."""
    prefix = f"agree-{unique}"
    first = EngineProcess(settings, prefix=prefix, data_dir=tmp_path / "a", partitions=PARTITIONS)
    second = EngineProcess(
        settings,
        prefix=prefix,
        data_dir=tmp_path / "b",
        partitions=PARTITIONS,
        extra_env={"TALLY_IDEMPOTENCY_RETENTION_S": "1"},
    )
    deposits = [
        Deposit(command_id=f"d{i}-{unique}", account=f"agree-{unique}-{i}", asset="USD", amount=5)
        for i in range(12)
    ]
    collector = Collector(settings.kafka_bootstrap, first.topics)
    await first.start()
    await collector.start(from_end=False)
    try:
        await produce(
            settings.kafka_bootstrap, first.topics.commands.name, list(map(command, deposits))
        )
        for d in deposits:
            assert await _statuses(collector, d.command_id, 1) == ["applied"]
        await second.start(wait=False)
        assert second.proc is not None
        try:
            code: int | None = await asyncio.wait_for(asyncio.shield(second.proc.wait()), 30)
        except TimeoutError:
            code = None  # it stayed: then it must at least not have changed anything
        await asyncio.sleep(3)  # what a 1 s retention would have pruned by now
        retries = list(map(command, deposits))
        await produce(settings.kafka_bootstrap, first.topics.commands.name, retries)
        for d in deposits:
            assert await _statuses(collector, d.command_id, 2) == ["applied", "duplicate"]
        assert code is not None and code != 0, second.tail()
        line = "TALLY_IDEMPOTENCY_RETENTION_S is 1 here but 604800 in the group"
        assert line in second.tail(), second.tail()
        # The first kept (or took back) every shard.
        for _ in range(300):
            body = await first.readyz()
            if sorted(body.get("serving", [])) == list(range(PARTITIONS)):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"shards not all served by the first:\n{first.tail()}")
        # Started again with the same setting: refused again.
        await second.start(wait=False)
        assert await asyncio.wait_for(second.proc.wait(), 60) != 0
        assert second.tail(10_000).count(line) == 2, second.tail()
    finally:
        await collector.stop()
        await second.stop()
        await first.stop()


async def test_a_worker_whose_clock_runs_ahead_prunes_nothing(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    """A worker with a right clock applies commands; a worker whose clock runs a year
    ahead (the same settings: the group accepts it) takes every shard over. Its clock
    disagrees with the broker's, so it prunes nothing, and the retries stay duplicates."""
    prefix = f"skew-{unique}"
    retention = {"TALLY_IDEMPOTENCY_RETENTION_S": "3600"}
    first = EngineProcess(
        settings, prefix=prefix, data_dir=tmp_path / "a", partitions=PARTITIONS, extra_env=retention
    )
    deposits = [
        Deposit(command_id=f"d{i}-{unique}", account=f"skew-{unique}-{i}", asset="USD", amount=5)
        for i in range(12)
    ]
    collector = Collector(settings.kafka_bootstrap, first.topics)
    await first.start()
    await collector.start(from_end=False)
    ahead = Engine(
        msgspec.structs.replace(
            settings,
            topic_prefix=prefix,
            partitions=PARTITIONS,
            data_dir=str(tmp_path / "b"),
            idempotency_retention_s=3600,
        ),
        clock=lambda: time.time() + YEAR_MS / 1000,
    )
    run = None
    try:
        produced = list(map(command, deposits))
        await produce(settings.kafka_bootstrap, first.topics.commands.name, produced)
        for d in deposits:
            assert await _statuses(collector, d.command_id, 1) == ["applied"]
        await first.stop()
        run = asyncio.create_task(ahead.run())
        for _ in range(300):
            if ahead.ready and ahead.owned == set(range(PARTITIONS)):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the worker with the clock ahead never took the shards")
        await produce(settings.kafka_bootstrap, first.topics.commands.name, produced[:1])
        await asyncio.sleep(4)  # several pruning passes (every 0.9 s) after a commit
        await produce(settings.kafka_bootstrap, first.topics.commands.name, produced)
        for i, d in enumerate(deposits):
            want = ["applied", "duplicate", "duplicate"] if i == 0 else ["applied", "duplicate"]
            assert await _statuses(collector, d.command_id, len(want)) == want
        assert ahead.counts["pruned"] == 0 and ahead.counts["clock_skewed"] == 1
        assert ahead.clock_skew_ms is not None and ahead.clock_skew_ms > YEAR_MS - 60_000
    finally:
        ahead.stop()
        if run is not None:
            await run
        await collector.stop()
        await first.stop()
