"""The chaos run's load: the seeded workload of `harness.workload` (transfers that mostly
cross shards, disbursements, holds with captures, releases and expiries, settings, exact
repeats, reused ids and undecodable garbage), produced at a fixed rate for a fixed time
while the faults happen."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

from aiokafka.errors import KafkaError

from core.settings import Settings
from harness.chaos.record import ChaosError, Run, Timeline
from harness.workload import build
from topics.names import deployment_topics
from topics.producer import durable_producer
from topics.schema import source


async def produce_load(
    settings: Settings,
    run: Run,
    timeline: Timeline,
    *,
    accounts: int,
    sent: dict[bytes, tuple[int, float]] | None = None,
    deadline_grace_s: float = 120.0,
) -> None:
    """Produce the seeded workload at `run.rate` records/s for `run.duration_s`, with
    acks=all; a send that fails is sent again (counted in `run.resent`), as a client
    would. Bounded: what is still unacknowledged after the duration and a grace for
    outages is reported (ChaosError), not waited for for ever.

    `sent` gets, for every acknowledged record that will be answered (it has a command
    id), its place on the commands topic (`tally-source`) -> (shard, when it was last
    sent): the produce side of the per-fault waits (harness.waits)."""
    total = int(run.rate * run.duration_s)
    work = build(count=total, accounts=accounts, seed=run.seed, now_ms=int(time.time() * 1000))
    topic = deployment_topics(settings).commands.name
    producer = durable_producer(settings.kafka_bootstrap, linger_ms=5)
    await producer.start()
    tick = 0.1
    per_tick = max(1, int(run.rate * tick))
    pending: list[tuple[Any, Any, float]] = []
    retry: list[Any] = []
    records = collections.deque(work.records)
    next_at = time.monotonic()
    # Bounded: the records are sent within the duration (plus a grace for outages);
    # what is still unacknowledged after it is reported, not waited for for ever.
    deadline = timeline.started + run.duration_s + deadline_grace_s
    try:
        while (records or retry or pending) and time.monotonic() < deadline:
            batch, retry = retry, []
            while records and len(batch) < per_tick:
                batch.append(records.popleft())
            for record in batch:
                at = time.monotonic()
                try:
                    future = await producer.send(topic, record.value, key=record.key.encode())
                except KafkaError:
                    retry.append(record)
                    continue
                pending.append((record, future, at))
            still = []
            for record, future, at in pending:
                if not future.done():
                    still.append((record, future, at))
                elif future.exception() is not None:
                    retry.append(record)
                    run.resent += 1
                else:
                    run.produced += 1
                    if sent is not None and record.command_id is not None:
                        placed = future.result()
                        sent[source(placed.partition, placed.offset)] = (placed.partition, at)
            pending = still
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 30)
    if records or retry or pending:
        raise ChaosError(
            f"the load could not be produced: {len(records) + len(retry) + len(pending)}"
            " records not acknowledged by Kafka"
        )
    timeline.note(f"load done: {run.produced} records acknowledged, {run.resent} resent")
