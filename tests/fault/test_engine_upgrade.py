"""A worker upgraded over a changelog written before idempotency was scoped by account
(issue #13, finding 4): the old shard-scoped records (`c|<command_id>`) still keep every
command they answered from applying twice, and new commands are scoped by account."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from core.settings import Settings
from harness.collector import Collector, all_answered
from harness.procs import EngineProcess, command, produce
from streams import ledger
from streams.store import ShardStore, legacy_command_key
from topics.admin import ensure_topics
from topics.names import changelog_name, engine_group, engine_topic_specs
from topics.producer import durable_producer
from topics.schema import Deposit, Reason, Status
from topics.shard import shard_of

pytestmark = pytest.mark.fault

PARTITIONS = 4


def _accounts(stem: str) -> tuple[str, str, str]:
    """Two accounts of one shard and one of another."""
    names = [f"{stem}-{n}" for n in range(200)]
    first = names[0]
    same = next(a for a in names[1:] if shard_of(a, PARTITIONS) == shard_of(first, PARTITIONS))
    other = next(a for a in names if shard_of(a, PARTITIONS) != shard_of(first, PARTITIONS))
    return first, same, other


async def test_old_layout_records_still_answer_and_new_ids_are_per_account(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    engine = EngineProcess(
        settings, prefix=f"upg-{unique}", data_dir=tmp_path / "state", partitions=PARTITIONS
    )
    alice, bob, carol = _accounts(f"u{unique}")
    first = Deposit(command_id="d1", account=alice, asset="USD", amount=9)
    # What an older engine left in the changelog after applying `first`.
    old = ShardStore(tmp_path / "old", "cl")
    old.commit(ledger.apply(old, first, int(time.time() * 1000)))
    written = [
        (legacy_command_key("d1") if key.startswith(b"c|") else key, value)
        for key, value in old.pending.items()
    ]
    old.close()
    app = engine_group(msgspec.structs.replace(settings, topic_prefix=engine.prefix))
    await ensure_topics(
        settings.kafka_bootstrap,
        engine_topic_specs(
            msgspec.structs.replace(settings, topic_prefix=engine.prefix, partitions=PARTITIONS),
            app,
        ),
    )
    producer = durable_producer(settings.kafka_bootstrap)
    await producer.start()
    try:
        for key, value in written:
            await producer.send_and_wait(
                changelog_name(app), value, key=key, partition=shard_of(alice, PARTITIONS)
            )
    finally:
        await producer.stop()

    await engine.start()
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await collector.start(from_end=False)
    same_id = [Deposit(command_id="d1", account=a, asset="USD", amount=4) for a in (bob, carol)]
    fresh = [Deposit(command_id="n1", account=a, asset="USD", amount=2) for a in (alice, bob)]
    try:
        await produce(
            settings.kafka_bootstrap,
            engine.topics.commands.name,
            [command(c) for c in (first, *same_id, *fresh)],
        )
        assert await collector.wait_for(
            all_answered({"d1": 3, "n1": 2}), timeout_s=90, say=lambda _: None
        ), engine.tail()
        results = collector.results
        balances = {a: (await engine.balances(a)).get("USD") for a in (alice, bob, carol)}
    finally:
        await collector.stop()
        await engine.stop()
    by_account = {(r.account, r.command_id): r for rs in results.by_id.values() for r in rs}
    assert by_account[(alice, "d1")].status is Status.DUPLICATE  # applied before the upgrade
    assert by_account[(bob, "d1")].reason is Reason.COMMAND_ID_REUSED  # legacy: shard-scoped
    assert by_account[(carol, "d1")].status is Status.APPLIED
    assert {by_account[(a, "n1")].status for a in (alice, bob)} == {Status.APPLIED}
    assert {a: (b.available, b.seq) if b else None for a, b in balances.items()} == {
        alice: (9 + 2, 2),
        bob: (2, 1),
        carol: (4, 1),
    }
