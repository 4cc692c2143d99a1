"""faust-streaming, aiokafka, rocksdict and our broker work together, with and without
Kafka transactions: a real Faust worker process consumes, keeps a RocksDB table and
produces through the local broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tally.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_faust_worker_round_trip(
    settings: Settings, unique: str, tmp_path: Path, guarantee: str
) -> None:
    src, dst = f"test.echo-in-{unique}", f"test.echo-out-{unique}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(t, 2, 1) for t in (src, dst)])
    env = {
        **os.environ,
        "FAUST_ECHO_APP_ID": f"echo-{unique}",
        "FAUST_ECHO_BOOTSTRAP": settings.kafka_bootstrap,
        "FAUST_ECHO_DATADIR": str(tmp_path / "data"),
        "FAUST_ECHO_GUARANTEE": guarantee,
        "FAUST_ECHO_IN": src,
        "FAUST_ECHO_OUT": dst,
    }
    log_path = tmp_path / "worker.log"
    log = log_path.open("wb")
    worker = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "faust", "-A", "tests.integration.faust_echo"),
        *("worker", "-l", "info"),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, isolation_level="read_committed"
    )
    await producer.start()
    await consumer.start()
    try:
        keys = [b"a", b"b", b"c", b"d"]
        for i in range(20):
            await producer.send_and_wait(src, key=keys[i % 4], value=b"m%d" % i)
        consumer.assign([TopicPartition(dst, p) for p in range(2)])
        await consumer.seek_to_beginning()
        got: list[bytes] = []
        async with asyncio.timeout(90):
            while len(got) < 20:
                assert worker.returncode is None, log_path.read_text()[-3000:]
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(r.value for r in records)
    finally:
        worker.terminate()
        try:
            await asyncio.wait_for(worker.wait(), 30)
        except TimeoutError:
            worker.kill()
            await worker.wait()
        log.close()
        await producer.stop()
        await consumer.stop()
        await admin.close()
    # Each key was seen 5 times; the table counted 1..5 for every key.
    assert sorted(got) == sorted(b"m%d|%d" % (i, i // 4 + 1) for i in range(20))
