"""Hostile records produced for real to a real engine worker: a blob whose dead letter
would be larger than the broker takes, a valid command over the record limit, a record
that kcat's CRC32 partitioner puts on the wrong shard. None may stop the worker or leave a
client without its answer (issue #13, findings 1, 7 and 8)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from core.settings import Settings
from harness.collector import Collector, all_answered, read_all
from harness.procs import EngineProcess, command, produce
from tests.integration.conftest import ENGINE_PARTITIONS, engine
from topics import limits
from topics.codec import decode_result, encode
from topics.producer import durable_producer
from topics.schema import SOURCE_HEADER, Deposit, Reason, Status, source, source_in
from topics.shard import shard_of

pytestmark = pytest.mark.fault
__all__ = ["engine"]

PARTITIONS = ENGINE_PARTITIONS


async def kcat_file(
    bootstrap: str, topic: str, path: Path, *, key: str, partition: int | None = None
) -> None:
    """Produce the whole file as one record (kcat: one file = one message)."""
    kcat = shutil.which("kcat")
    assert kcat, "kcat is not installed: scripts/services.sh up installs it"
    args = [kcat, "-P", "-b", bootstrap, "-t", topic, "-k", key]
    if partition is not None:
        args += ["-p", str(partition)]
    proc = await asyncio.create_subprocess_exec(*args, str(path), stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def kcat_lines(bootstrap: str, topic: str, lines: list[tuple[str, bytes]]) -> None:
    """The README's recipe: `key<TAB>value` lines, kcat's default (CRC32) partitioner."""
    kcat = shutil.which("kcat")
    assert kcat, "kcat is not installed: scripts/services.sh up installs it"
    payload = b"".join(key.encode() + b"\t" + value + b"\n" for key, value in lines)
    proc = await asyncio.create_subprocess_exec(
        kcat, "-P", "-b", bootstrap, "-t", topic, "-K", "\\t",
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate(payload)
    assert proc.returncode == 0, err.decode()


def misplaced_by_crc32(stem: str) -> str:
    """An account id that librdkafka's CRC32 partitioner puts on a shard not its own."""
    for n in range(1000):
        account = f"{stem}-{n}"
        if zlib.crc32(account.encode()) % PARTITIONS != shard_of(account, PARTITIONS):
            return account
    raise AssertionError("no misplaced account id found")


def alive(engine: EngineProcess) -> bool:
    return engine.proc is not None and engine.proc.returncode is None


async def _wait(collector: Collector, engine: EngineProcess, expected: dict[str, int]) -> None:
    assert await collector.wait_for(all_answered(expected), timeout_s=90, say=lambda _: None), (
        engine.tail()
    )


async def test_a_blob_of_0xff_is_dead_lettered_small_and_the_deposit_behind_it_applies(
    settings: Settings, engine: EngineProcess, unique: str, tmp_path: Path
) -> None:
    account = f"poison-{unique}"
    p = shard_of(account, PARTITIONS)
    blob = b"\xff" * 250_000
    path = tmp_path / "blob"
    path.write_bytes(blob)
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await collector.start(from_end=False)
    try:
        await kcat_file(
            settings.kafka_bootstrap, engine.topics.commands.name, path, key=account, partition=p
        )
        deposit = Deposit(command_id=f"d-{unique}", account=account, asset="USD", amount=7)
        await produce(settings.kafka_bootstrap, engine.topics.commands.name, [command(deposit)])
        await _wait(collector, engine, {deposit.command_id: 1})
        assert await collector.wait_for(
            lambda r: len(r.dead_letters) >= 1, timeout_s=30, say=lambda _: None
        )
        results = collector.results
    finally:
        await collector.stop()
    assert alive(engine), engine.tail()
    assert [r.status for r in results.by_id[deposit.command_id]] == [Status.APPLIED]
    assert (await engine.balances(account))["USD"].available == 7
    [letter] = results.dead_letters
    assert (letter.source_topic, letter.source_partition) == (engine.topics.commands.name, p)
    assert letter.raw_len == len(blob) and letter.truncated
    assert letter.raw_sha256 == hashlib.sha256(blob).hexdigest()
    assert len(encode(letter)) <= limits.DEAD_LETTER_BYTES_MAX
    counts = (await engine.readyz())["counts"]
    assert counts.get("batches_failed", 0) == 0, counts


async def test_an_oversize_command_naming_its_id_is_rejected_record_too_large(
    settings: Settings, engine: EngineProcess, unique: str
) -> None:
    account = f"big-{unique}"
    base: dict[str, Any] = {"kind": "deposit", "account": account, "asset": "USD", "amount": 5}
    # Just over the record limit (decoded under the salvage cap), and far over it (only a
    # bounded prefix is scanned for the id): both answer their command_id.
    over = {**base, "command_id": f"o1-{unique}", "memo": "x" * limits.COMMAND_BYTES_MAX}
    far = {"command_id": f"o2-{unique}", **base, "memo": "y" * (900 * 1024)}
    deposit = Deposit(command_id=f"d-{unique}", account=account, asset="USD", amount=3)
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await collector.start(from_end=False)
    try:
        await produce(
            settings.kafka_bootstrap,
            engine.topics.commands.name,
            [
                (account, json.dumps(over).encode(), None),
                (account, json.dumps(far).encode(), None),
                command(deposit),
            ],
        )
        await _wait(
            collector, engine, {over["command_id"]: 1, far["command_id"]: 1, deposit.command_id: 1}
        )
        results = collector.results
    finally:
        await collector.stop()
    assert alive(engine), engine.tail()
    for cid in (over["command_id"], far["command_id"]):
        [result] = results.by_id[cid]
        assert (result.status, result.reason) == (Status.REJECTED, Reason.RECORD_TOO_LARGE)
        assert result.account == account and result.kind == "deposit"
    assert results.dead_letters == []
    assert (await engine.balances(account))["USD"].available == 3


async def test_a_kcat_record_on_the_wrong_shard_is_answered_with_its_own_source(
    settings: Settings, engine: EngineProcess, unique: str
) -> None:
    account = misplaced_by_crc32(f"kc-{unique}")
    cid = f"k-{unique}"
    value = json.dumps(
        {"kind": "deposit", "command_id": cid, "account": account, "asset": "USD", "amount": 9}
    ).encode()
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await collector.start(from_end=False)
    try:
        await kcat_lines(settings.kafka_bootstrap, engine.topics.commands.name, [(account, value)])
        await _wait(collector, engine, {cid: 1})
    finally:
        await collector.stop()
    commands, _ = await read_all(settings.kafka_bootstrap, engine.topics.commands.name, PARTITIONS)
    produced = [r for r in commands if r.value == value and source_in(r.headers) is None]
    assert [r.partition for r in produced] == [zlib.crc32(account.encode()) % PARTITIONS]
    events, _ = await read_all(settings.kafka_bootstrap, engine.topics.events.name, PARTITIONS)
    answers = [source_in(r.headers) for r in events if decode_result(r.value).command_id == cid]
    assert answers == [source(produced[0].partition, produced[0].offset)]


async def test_a_record_the_broker_refuses_is_isolated_and_the_batch_around_it_applies(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    """A dead-letter topic whose max.message.bytes is smaller than a (bounded) letter: the
    broker refuses the batch in the middle of its transaction. The batch is split until
    the blob is alone, the blob gets a letter without its bytes, and every deposit before
    and after it in the same batch is applied exactly once."""
    engine = EngineProcess(
        settings, prefix=f"poison-{unique}", data_dir=tmp_path / "state", partitions=PARTITIONS
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    engine.topics.dead_letter.name,
                    num_partitions=PARTITIONS,
                    replication_factor=1,
                    topic_configs={"max.message.bytes": "8192"},
                )
            ]
        )
    finally:
        await admin.close()
    account = f"iso-{unique}"
    blob = os.urandom(8192)
    deposits = [
        Deposit(command_id=f"d{n}-{unique}", account=account, asset="USD", amount=n + 1)
        for n in range(40)
    ]
    records = [command(d) for d in deposits[:20]]
    records += [(account, b"x", None), (account, blob, None)]
    records += [command(d) for d in deposits[20:]]
    await engine.start()
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await collector.start(from_end=False)
    try:
        await produce(settings.kafka_bootstrap, engine.topics.commands.name, records)
        await _wait(collector, engine, {d.command_id: 1 for d in deposits})
        assert await collector.wait_for(
            lambda r: len(r.dead_letters) >= 2, timeout_s=30, say=lambda _: None
        ), engine.tail()
        results = collector.results
        counts = (await engine.readyz())["counts"]
        assert alive(engine), engine.tail()
        balance = (await engine.balances(account))["USD"]
    finally:
        await collector.stop()
        await engine.stop()
    assert all(
        [r.status for r in results.by_id[d.command_id]] == [Status.APPLIED] for d in deposits
    )
    assert (balance.available, balance.seq) == (sum(d.amount for d in deposits), 40)
    small, cut = sorted(results.dead_letters, key=lambda letter: letter.source_offset)
    assert (small.raw, small.truncated) == ("x", False)
    assert (cut.raw, cut.truncated, cut.raw_len) == ("", True, len(blob))
    assert cut.raw_sha256 == hashlib.sha256(blob).hexdigest()
    assert counts.get("isolated") == 1 and counts.get("batches_failed", 0) == 0, counts


async def test_a_forged_source_header_naming_its_own_partition_is_ignored(
    settings: Settings, engine: EngineProcess, unique: str
) -> None:
    """Only a forwarded copy stands for another record, and a copy always names another
    partition: a producer cannot make its result pose as the answer to a record on its
    own partition (where the ingress's records are)."""
    account = f"forge-{unique}"
    p = shard_of(account, PARTITIONS)
    deposit = Deposit(command_id=f"f-{unique}", account=account, asset="USD", amount=1)
    producer = durable_producer(settings.kafka_bootstrap)
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            engine.topics.commands.name, encode(deposit), key=account.encode(), partition=p,
            headers=[(SOURCE_HEADER, source(p, 0))],
        )  # fmt: skip
    finally:
        await producer.stop()
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await collector.start(from_end=False)
    try:
        await _wait(collector, engine, {deposit.command_id: 1})
    finally:
        await collector.stop()
    events, _ = await read_all(settings.kafka_bootstrap, engine.topics.events.name, PARTITIONS)
    answers = [
        source_in(r.headers)
        for r in events
        if decode_result(r.value).command_id == deposit.command_id
    ]
    assert answers == [source(p, sent.offset)]
