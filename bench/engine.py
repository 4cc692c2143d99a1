"""`tally bench engine`: sustained engine throughput, produce->result latency and the raw
pipe ceiling, measured against the real broker and printed as a table plus a JSON report.

Method. N commands of the seeded mixed workload are produced first. An engine worker
process is then started on them: throughput is client commands answered per second,
from the first result to the last (worker start-up and recovery excluded). With the
worker still running, one untimed warm-up deposit is answered, then a paced stream of
commands at a rate it can keep up with gives the latency from produce to the result
being readable (read-committed). The raw pipe
is plain aiokafka consume -> produce of the same records with no state and no
decoding: the ceiling any Python consumer on this broker and machine starts from.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.report import BenchError, Column, pct, show, table, write_report
from core.settings import Settings
from harness.collector import Collector, all_answered, expected_counts
from harness.procs import EngineProcess, produce
from harness.scratch import deployment, unique_prefix
from harness.workload import Record, build
from topics.producer import durable_producer
from topics.specs import TopicSpec

drain_timeout_s = 900.0
latency_rate_per_s = 200
latency_seconds = 10
raw_pipe_timeout_s = 300.0
ENGINE_COLUMNS = (
    Column("run", 22),
    Column("commands/s", 12, ",.0f"),
    Column("results/s", 12, ",.0f"),
    Column("p50 ms", 9, ".1f"),
    Column("p99 ms", 9, ".1f"),
    Column("vs pipe", 9, ".1%"),
)


@dataclass
class EngineResult:
    guarantee: str
    commands: int
    produce_per_s: float
    applied_per_s: float
    results_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_samples: int


def _records(records: list[Record]) -> list[tuple[str, bytes, int | None]]:
    return [(r.key, r.value, None) for r in records]


async def engine_phase(
    settings: Settings, *, guarantee: str, count: int, workdir: Path, say: Callable[[str], None]
) -> EngineResult:
    prefix = unique_prefix("bench")
    proc = EngineProcess(
        settings,
        prefix=prefix,
        data_dir=workdir / prefix,
        guarantee=guarantee,
        partitions=settings.partitions,
    )
    scratch = deployment(settings, prefix, topics="engine", data_dir=proc.data_dir)
    await scratch.create()
    work = build(
        count=count,
        accounts=max(100, count // 20),
        seed=1,
        now_ms=int(time.time() * 1000),
        expiring_holds=False,
    )
    say(f"[{guarantee}] producing {len(work.records):,} commands to {prefix}.commands")
    produce_rate = await produce(
        settings.kafka_bootstrap, proc.topics.commands.name, _records(work.records)
    )
    expected = expected_counts(r.command_id for r in work.records)
    collector = Collector(settings.kafka_bootstrap, proc.topics)
    await collector.start(from_end=False)
    try:
        say(f"[{guarantee}] starting an engine worker on the backlog")
        await proc.start()
        done = all_answered(expected)
        if not await collector.wait_for(done, timeout_s=drain_timeout_s, say=say):
            raise BenchError(f"engine did not drain {count} commands in {drain_timeout_s}s")
        results = collector.results
        client_times = [results.received_at[i] for i in expected]
        first = min(results.received_at.values())
        applied_rate = len(client_times) / max(max(client_times) - first, 1e-9)
        results_rate = results.count / max(results.last_at - first, 1e-9)
        say(f"[{guarantee}] measuring latency at {latency_rate_per_s}/s for {latency_seconds}s")
        latencies = await _latency(settings, proc, collector)
    finally:
        await collector.stop()
        await proc.stop()
        await scratch.drop()
    return EngineResult(
        guarantee=guarantee,
        commands=len(work.records),
        produce_per_s=produce_rate,
        applied_per_s=applied_rate,
        results_per_s=results_rate,
        latency_p50_ms=pct(latencies, 50),
        latency_p99_ms=pct(latencies, 99),
        latency_samples=len(latencies),
    )


async def _latency(settings: Settings, proc: EngineProcess, collector: Collector) -> list[float]:
    """Paced deposits, each timed from its send to its result arriving at the collector."""
    producer = durable_producer(settings.kafka_bootstrap)
    await producer.start()
    sent: dict[str, float] = {}
    run = uuid.uuid4().hex[:6]
    try:
        # Not timed: the first send waits for metadata and connections, and the engine
        # may still be finishing the backlog's credits. One deposit, answered, first.
        warm = f"lat-{run}-warm"
        value = json.dumps(
            {"kind": "deposit", "command_id": warm, "account": "lat-0", "asset": "USD",
             "amount": 1}
        ).encode()  # fmt: skip
        await producer.send_and_wait(proc.topics.commands.name, key=b"lat-0", value=value)
        await collector.wait_for(lambda r: warm in r.by_id, timeout_s=60, say=lambda _: None)
        total = latency_rate_per_s * latency_seconds
        started = time.monotonic()
        for i in range(total):
            due = started + i / latency_rate_per_s
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            command_id = f"lat-{run}-{i}"
            value = json.dumps(
                {
                    "kind": "deposit",
                    "command_id": command_id,
                    "account": f"lat-{i % 97}",
                    "asset": "USD",
                    "amount": 1,
                }
            ).encode()
            sent[command_id] = time.monotonic()
            await producer.send(
                proc.topics.commands.name, key=f"lat-{i % 97}".encode(), value=value
            )
    finally:
        await producer.stop()
    await collector.wait_for(
        lambda r: all(i in r.by_id for i in sent), timeout_s=60, say=lambda _: None
    )
    received = collector.results.received_at
    return [(received[i] - t) * 1000 for i, t in sent.items() if i in received]


async def raw_pipe(settings: Settings, *, count: int, say: Callable[[str], None]) -> float:
    """records/s of a stateless aiokafka consume -> produce loop over `count` records."""
    prefix = unique_prefix("bench-pipe")
    n = settings.partitions
    source = TopicSpec(name=f"{prefix}.in", partitions=n, cleanup_policy="delete", retention_ms=-1)
    sink = TopicSpec(name=f"{prefix}.out", partitions=n, cleanup_policy="delete", retention_ms=-1)
    scratch = deployment(settings, prefix, extra=[source, sink])
    await scratch.create()
    work = build(count=count, accounts=max(100, count // 20), seed=1, now_ms=0)
    await produce(settings.kafka_bootstrap, source.name, _records(work.records))
    say(f"[raw pipe] consume -> produce of {count:,} records")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    producer = durable_producer(
        settings.kafka_bootstrap,
        linger_ms=5,
        max_batch_size=512 * 1024,
    )
    await consumer.start()
    await producer.start()
    try:
        tps = [TopicPartition(source.name, p) for p in range(n)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        moved = 0
        started = time.perf_counter()
        deadline = time.monotonic() + raw_pipe_timeout_s
        while moved < len(work.records) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            futures = []
            for tp, records in batches.items():
                for r in records:
                    futures.append(
                        await producer.send(
                            sink.name, key=r.key, value=r.value, partition=tp.partition
                        )
                    )
            await asyncio.gather(*futures)
            moved += len(futures)
        return moved / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await producer.stop()
        await scratch.drop()


async def run(
    settings: Settings,
    *,
    count: int,
    guarantees: list[str],
    report: Path,
    say: Callable[[str], None] = print,
) -> dict[str, object]:
    workdir = Path(settings.data_dir) / "bench"
    engines = [
        await engine_phase(settings, guarantee=g, count=count, workdir=workdir, say=say)
        for g in guarantees
    ]
    pipe = await raw_pipe(settings, count=count, say=say)
    out: dict[str, object] = {
        "commands": count,
        "partitions": settings.partitions,
        "raw_pipe_per_s": pipe,
        "engine": [asdict(e) for e in engines],
    }
    await asyncio.to_thread(write_report, report, out)
    rows: list[tuple[object, ...]] = [
        (f"engine {e.guarantee}", e.applied_per_s, e.results_per_s, e.latency_p50_ms,
         e.latency_p99_ms, e.applied_per_s / pipe)
        for e in engines
    ]  # fmt: skip
    show(say, table(ENGINE_COLUMNS, [*rows, ("raw pipe (no state)", pipe)]), report)
    return out
