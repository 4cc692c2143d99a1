"""Producing commands straight to Kafka is a way in of its own: with kcat (whose default
partitioner is CRC32, not murmur2, so records land on the wrong shard and must be
forwarded) and with a few lines of aiokafka, exactly as the README shows."""

from __future__ import annotations

import asyncio
import json
import shutil
import zlib

import aiohttp
from aiokafka import AIOKafkaProducer

from core.settings import Settings
from harness.collector import Collector, all_answered
from harness.procs import EngineProcess
from tests.integration.conftest import ENGINE_PARTITIONS
from topics.shard import shard_of

PARTITIONS = ENGINE_PARTITIONS


def _misplaced_by_crc32(stem: str) -> str:
    """An account id that librdkafka's CRC32 partitioner puts on a shard not its own."""
    for n in range(1000):
        account = f"{stem}-{n}"
        if zlib.crc32(account.encode()) % PARTITIONS != shard_of(account, PARTITIONS):
            return account
    raise AssertionError("no misplaced account id found")


async def test_kcat_produced_commands_are_applied_on_their_shard(
    settings: Settings, engine: EngineProcess, unique: str
) -> None:
    kcat = shutil.which("kcat")
    assert kcat, "kcat is not installed: scripts/services.sh up installs it"
    account = _misplaced_by_crc32(f"kcat-{unique}")
    lines = [
        {"kind": "deposit", "command_id": f"k1-{unique}", "account": account,
         "asset": "USD", "amount": 1500},
        {"kind": "withdraw", "command_id": f"k2-{unique}", "account": account,
         "asset": "USD", "amount": 400},
    ]  # fmt: skip
    # The README's command: key, a tab, the JSON; one record per line.
    payload = "".join(f"{account}\t{json.dumps(line)}\n" for line in lines).encode()
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await collector.start(from_end=False)
    try:
        proc = await asyncio.create_subprocess_exec(
            kcat,
            "-P",
            "-b",
            settings.kafka_bootstrap,
            "-t",
            engine.topics.commands.name,
            "-K",
            "\\t",  # as typed in the README: kcat unescapes it
            stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate(payload)
        assert proc.returncode == 0, err.decode()
        expected = {f"k1-{unique}": 1, f"k2-{unique}": 1}
        assert await collector.wait_for(all_answered(expected), timeout_s=60, say=lambda _: None), (
            engine.tail()
        )
        results = collector.results
    finally:
        await collector.stop()
    assert [r.status.value for r in results.by_id[f"k1-{unique}"]] == ["applied"]
    assert [r.status.value for r in results.by_id[f"k2-{unique}"]] == ["applied"]
    balances = await engine.balances(account)
    assert (balances["USD"].available, balances["USD"].seq) == (1100, 2)
    counts = (await engine.readyz())["counts"]
    assert isinstance(counts, dict) and counts["forwarded"] == 2


async def test_aiokafka_produced_commands_are_applied(
    settings: Settings, engine: EngineProcess, unique: str
) -> None:
    account = f"py-{unique}"
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await collector.start(from_end=False)
    try:
        # The README's snippet, with the topic and ids of this test.
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            command = {
                "kind": "deposit",
                "command_id": f"p1-{unique}",
                "account": account,
                "asset": "EUR",
                "amount": 250,
            }
            await producer.send_and_wait(
                engine.topics.commands.name,
                key=account.encode(),
                value=json.dumps(command).encode(),
            )
        finally:
            await producer.stop()
        assert await collector.wait_for(
            all_answered({f"p1-{unique}": 1}), timeout_s=60, say=lambda _: None
        ), engine.tail()
    finally:
        await collector.stop()
    assert (await engine.balances(account))["EUR"].available == 250


async def test_the_view_refuses_a_bad_account_id_naming_the_field(engine: EngineProcess) -> None:
    async with aiohttp.ClientSession() as session:
        for bad in ("a" * 65, "has space", "semi;colon"):
            url = f"http://127.0.0.1:{engine.port}/balances/{bad}"
            async with session.get(url) as response:
                assert response.status == 400, bad
                assert response.content_type == "application/problem+json"
                assert (await response.json())["field"] == "account"
