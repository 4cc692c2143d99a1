"""`tally bench engine`: sustained engine throughput, produce->result latency and the raw
pipe ceiling, measured against the real broker and printed as a table plus a JSON report.

Method. N commands of the seeded mixed workload are produced first. An engine worker
process (or `workers` of them, in one consumer group) is then started on them:
throughput is client commands answered per second, from the moment every worker is
ready (or the first result, if that came sooner) to the last result: worker start-up and
recovery excluded, but not the first batch (a big poll's first results come only after
its whole batch is decided and committed, seconds in). With the
worker still running, one untimed warm-up deposit is answered and the paced stream runs
untimed for a few seconds (the broker's tail of the backlog, see latency_settle_seconds);
then the same paced stream, at a rate the worker keeps up with, gives the latency from
produce to the result being readable (read-committed). The raw pipe
is plain aiokafka consume -> produce of the same records with no state and no
decoding, one `send` per record: the ceiling any Python consumer on this broker and
machine starts from, and the normaliser of the "vs pipe" column. The batched pipe, for
information, is the same loop sending one Kafka batch per partition per poll, as the
engine does: the best a plain aiokafka pipe reaches here. The worker's CPU seconds
over the drain (commands per CPU second) are reported beside the rates: on a shared
machine they move less than wall-clock rates do; so does "on commit", the share of the
drain the worker spent waiting for its transaction in flight. Below the table, the cores
each side used over the drain: the workers, the local broker (the JVM of `make services`,
when this machine runs it) and this bench process (its collector reading the results),
so a run shows which of them the machine's cores went to.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.report import BenchError, Column, pct, show, table, write_report
from core.settings import Settings
from harness.cluster import kafka_cluster_in_use, local_broker_pid
from harness.collector import Collector, all_answered, expected_counts
from harness.faults import FaultUnavailable
from harness.procs import EngineProcess, produce
from harness.scratch import deployment, unique_prefix
from harness.workload import Record, build
from topics.names import replicas
from topics.producer import durable_producer
from topics.specs import TopicSpec

drain_timeout_s = 900.0
latency_rate_per_s = 200
latency_seconds = 10
# Paced but not timed, before the timed window: right after a backlog the broker is still
# busy with its tail (transaction markers, the last internal credits), and the first
# commands after it took 1-2 s to be answered, up to 0.5 s of it in the broker's append
# alone (64 partitions, from the records' append times). That is the end of the drain, not
# the paced latency.
latency_settle_seconds = 3
raw_pipe_timeout_s = 300.0
# How often the CPU of the workers, the broker and the bench is read during the drain
# (/proc counts in 10 ms ticks).
cpu_sample_s = 0.1
ENGINE_COLUMNS = (
    Column("run", 22),
    Column("commands/s", 12, ",.0f"),
    Column("results/s", 12, ",.0f"),
    Column("p50 ms", 9, ".1f"),
    Column("p99 ms", 9, ".1f"),
    Column("vs pipe", 9, ".1%"),
    Column("per CPU s", 11, ",.0f"),
    Column("on commit", 11, ".0%"),
)


@dataclass
class EngineResult:
    guarantee: str
    workers: int
    commands: int
    produce_per_s: float
    applied_per_s: float
    results_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_samples: int
    # CPU the worker processes used over the rate's window (ready or first result, to the
    # last result), and commands per CPU second: steadier than wall time on a shared,
    # noisy machine (though not steady: it moved by a third within an hour there).
    worker_cpu_s: float
    commands_per_cpu_s: float
    # The share of the drain the workers spent waiting for their transaction in flight,
    # with nothing else to decide (their `commit_wait_s`): steadier than the rates
    # on a shared machine, and what deciding while committing could win at most.
    waiting_on_commit: float
    # Cores used over the drain (CPU seconds / drain seconds): the workers, the local
    # broker (NaN when it is not this machine's `make services` broker) and this process.
    worker_cores: float
    broker_cores: float
    bench_cores: float


def _records(records: list[Record]) -> list[tuple[str, bytes, int | None]]:
    return [(r.key, r.value, None) for r in records]


async def engine_phase(
    settings: Settings,
    *,
    guarantee: str,
    count: int,
    workdir: Path,
    say: Callable[[str], None],
    workers: int = 1,
) -> EngineResult:
    prefix = unique_prefix("bench")
    procs = [
        EngineProcess(
            settings,
            prefix=prefix,
            data_dir=workdir / prefix / f"worker-{n}",
            guarantee=guarantee,
            partitions=settings.partitions,
        )
        for n in range(workers)
    ]
    proc = procs[0]
    scratch = deployment(settings, prefix, topics="engine", data_dir=workdir / prefix)
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
    broker = local_broker(settings)
    clock = CpuClock(lambda: [*(_cpu_s(p) for p in procs), _cpu_of(broker), time.process_time()])
    try:
        say(f"[{guarantee}] starting {workers} engine worker(s) in one group on the backlog")
        # Sampled from before the workers start: the first of them drains while the
        # others start, and the window begins with the first result if that is sooner.
        clock.start()
        await asyncio.gather(*(p.start() for p in procs))
        ready_at = time.monotonic()
        wait_at_start = sum(await asyncio.gather(*(_commit_wait_s(p) for p in procs)))
        done = all_answered(expected)
        if not await collector.wait_for(done, timeout_s=drain_timeout_s, say=say):
            raise BenchError(f"engine did not drain {count} commands in {drain_timeout_s}s")
        wait_s = sum(await asyncio.gather(*(_commit_wait_s(p) for p in procs))) - wait_at_start
        await clock.stop()
        results = collector.results
        client_times = [results.received_at[i] for i in expected]
        first = min(ready_at, *results.received_at.values())
        drain_s = max(max(client_times) - first, 1e-9)
        # CPU over the same window as the rate.
        used = clock.between(first, max(client_times))
        worker_cpu_s, broker_cpu_s, bench_cpu_s = sum(used[:workers]), used[-2], used[-1]
        applied_rate = len(client_times) / drain_s
        results_rate = results.count / max(results.last_at - first, 1e-9)
        say(
            f"[{guarantee}] measuring latency at {latency_rate_per_s}/s for {latency_seconds}s"
            f" (after {latency_settle_seconds}s untimed)"
        )
        # The bench holds the workload and every result read so far, hundreds of thousands
        # of objects: a full collection of them inside the timed window is a pause of the
        # measuring process, not of the engine (traced: 30-39 ms, twice in one 10 s window
        # after 20,000 commands). Frozen, the collector only scans what the window makes.
        gc.freeze()
        try:
            latencies = await _latency(settings, proc, collector)
        finally:
            gc.unfreeze()
    finally:
        await clock.stop()  # again after a drain, harmless; after a failure, not left running
        await collector.stop()
        await asyncio.gather(*(p.stop() for p in procs))
        await scratch.drop()
    return EngineResult(
        guarantee=guarantee,
        workers=workers,
        commands=len(work.records),
        produce_per_s=produce_rate,
        applied_per_s=applied_rate,
        results_per_s=results_rate,
        latency_p50_ms=pct(latencies, 50),
        latency_p99_ms=pct(latencies, 99),
        latency_samples=len(latencies),
        worker_cpu_s=worker_cpu_s,
        commands_per_cpu_s=len(work.records) / worker_cpu_s if worker_cpu_s > 0 else math.nan,
        waiting_on_commit=wait_s / drain_s / workers,
        worker_cores=worker_cpu_s / drain_s,
        broker_cores=broker_cpu_s / drain_s,
        bench_cores=bench_cpu_s / drain_s,
    )


async def _commit_wait_s(proc: EngineProcess) -> float:
    """The worker's time so far waiting for its transaction in flight (/readyz)."""
    return float((await proc.readyz()).get("commit_wait_s", 0.0))


class CpuClock:
    """CPU seconds of some processes (`read` gives each one's so far), sampled every
    cpu_sample_s from `start` to `stop`, so that they can be read over a window known
    only afterwards (`between`). A process not started yet reads NaN and counts 0."""

    def __init__(self, read: Callable[[], list[float]]) -> None:
        self.read = read
        self.samples: list[tuple[float, list[float]]] = []
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        values = [0.0 if math.isnan(v) else v for v in self.read()]
        self.samples.append((time.monotonic(), values))

    def start(self) -> None:
        self.sample()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(cpu_sample_s)
            self.sample()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.sample()

    def between(self, start: float, end: float) -> list[float]:
        """Each process's CPU seconds from `start` to `end` (monotonic), from the samples
        around each end, interpolated."""
        return [b - a for a, b in zip(self._at(start), self._at(end), strict=True)]

    def _at(self, when: float) -> list[float]:
        samples = self.samples
        before = max((s for s in samples if s[0] <= when), default=samples[0], key=lambda s: s[0])
        after = min((s for s in samples if s[0] >= when), default=samples[-1], key=lambda s: s[0])
        if after[0] <= before[0]:
            return list(after[1])
        share = (when - before[0]) / (after[0] - before[0])
        return [a + (b - a) * share for a, b in zip(before[1], after[1], strict=True)]


def _cpu_s(proc: EngineProcess) -> float:
    """User + system CPU seconds of the worker process so far (NaN if it is gone)."""
    return _cpu_of(None if proc.proc is None else proc.proc.pid)


def pid_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc; NaN elsewhere, or
    when there is no such process)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


def local_broker(settings: Settings) -> int | None:
    """The pid of the broker `make services` runs on this machine, the one the bench
    uses; None when there is none or the bench runs against the three-broker cluster.
    (Its CPU is read from this pid at both ends of the drain: a broker restarted in
    between reads NaN, unless the system gave its pid to a new process meanwhile.)"""
    if kafka_cluster_in_use(settings):
        return None
    try:
        return local_broker_pid()
    except FaultUnavailable:
        return None


def _cpu_of(pid: int | None) -> float:
    return math.nan if pid is None else pid_cpu_s(pid)


async def _latency(settings: Settings, proc: EngineProcess, collector: Collector) -> list[float]:
    """Paced deposits, each timed from its send to its result arriving at the collector."""
    producer = durable_producer(settings.kafka_bootstrap)
    await producer.start()
    sent: dict[str, float] = {}
    run = uuid.uuid4().hex[:6]
    try:
        # Not timed: the first send waits for metadata and connections, and the engine
        # may still be finishing the backlog's credits. One deposit, answered, first,
        # then latency_settle_seconds of the paced stream.
        warm = f"lat-{run}-warm"
        value = json.dumps(
            {"kind": "deposit", "command_id": warm, "account": "lat-0", "asset": "USD",
             "amount": 1}
        ).encode()  # fmt: skip
        await producer.send_and_wait(proc.topics.commands.name, key=b"lat-0", value=value)
        await collector.wait_for(lambda r: warm in r.by_id, timeout_s=60, say=lambda _: None)
        settle = latency_rate_per_s * latency_settle_seconds
        total = settle + latency_rate_per_s * latency_seconds
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
            if i >= settle:
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
    """records/s of a stateless aiokafka consume -> produce loop over `count` records, one
    `producer.send` per record: the normaliser every engine figure is compared with."""

    async def move(producer: AIOKafkaProducer, sink: str, batches: Polled) -> int:
        futures = []
        for tp, records in batches.items():
            for r in records:
                futures.append(
                    await producer.send(sink, key=r.key, value=r.value, partition=tp.partition)
                )
        await asyncio.gather(*futures)
        return len(futures)

    return await _pipe(settings, count=count, say=say, name="raw pipe", move=move)


async def batched_pipe(settings: Settings, *, count: int, say: Callable[[str], None]) -> float:
    """records/s of the same loop building one Kafka batch per partition per poll
    (`create_batch`/`send_batch`, a full batch sent and a new one started), as the engine
    sends its outputs: the best plain aiokafka pipe, for information."""

    async def move(producer: AIOKafkaProducer, sink: str, batches: Polled) -> int:
        futures = []
        for tp, records in batches.items():
            builder = producer.create_batch()
            for r in records:
                if builder.append(key=r.key, value=r.value, timestamp=None) is None:
                    futures.append(await producer.send_batch(builder, sink, partition=tp.partition))
                    builder = producer.create_batch()
                    builder.append(key=r.key, value=r.value, timestamp=None)
            futures.append(await producer.send_batch(builder, sink, partition=tp.partition))
        await asyncio.gather(*futures)
        return sum(len(records) for records in batches.values())

    return await _pipe(settings, count=count, say=say, name="batched pipe", move=move)


Polled = dict[TopicPartition, list[Any]]


async def _pipe(
    settings: Settings,
    *,
    count: int,
    say: Callable[[str], None],
    name: str,
    move: Callable[[AIOKafkaProducer, str, Polled], Awaitable[int]],
) -> float:
    """records/s of consume -> `move` (which produces a poll's records to the sink and
    waits for them) over `count` records of the workload, on topics of its own."""
    prefix = unique_prefix("bench-pipe")
    n = settings.partitions
    copies = replicas(settings)
    source, sink = (
        TopicSpec(name=f"{prefix}.{end}", partitions=n, cleanup_policy="delete",
                  retention_ms=-1, replicas=copies)
        for end in ("in", "out")
    )  # fmt: skip
    scratch = deployment(settings, prefix, extra=[source, sink])
    await scratch.create()
    work = build(count=count, accounts=max(100, count // 20), seed=1, now_ms=0)
    await produce(settings.kafka_bootstrap, source.name, _records(work.records))
    say(f"[{name}] consume -> produce of {count:,} records")
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
            moved += await move(producer, sink.name, batches)
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
    workers: int = 1,
) -> dict[str, object]:
    workdir = Path(settings.data_dir) / "bench"
    engines = [
        await engine_phase(
            settings, guarantee=g, count=count, workdir=workdir, say=say, workers=workers
        )
        for g in guarantees
    ]
    pipe = await raw_pipe(settings, count=count, say=say)
    batched = await batched_pipe(settings, count=count, say=say)
    out: dict[str, object] = {
        "commands": count,
        "partitions": settings.partitions,
        "workers": workers,
        "raw_pipe_per_s": pipe,
        "batched_pipe_per_s": batched,
        "engine": [asdict(e) for e in engines],
    }
    await asyncio.to_thread(write_report, report, out)
    rows: list[tuple[object, ...]] = [
        (f"engine {e.guarantee}" + (f" x{e.workers}" if e.workers > 1 else ""),
         e.applied_per_s, e.results_per_s, e.latency_p50_ms, e.latency_p99_ms,
         e.applied_per_s / pipe, e.commands_per_cpu_s, e.waiting_on_commit)
        for e in engines
    ]  # fmt: skip
    rows += [
        ("raw pipe (no state)", pipe),
        ("batched pipe (info)", batched, "", "", "", batched / pipe),
    ]
    lines = table(ENGINE_COLUMNS, rows)
    lines += ["", f"cores used over the drain (this machine has {os.cpu_count() or 0}):"]
    lines += [
        f"  engine {e.guarantee}: workers {e.worker_cores:.2f}, broker "
        + ("n/a (not this checkout's)" if math.isnan(e.broker_cores) else f"{e.broker_cores:.2f}")
        + f", bench (collector) {e.bench_cores:.2f}"
        for e in engines
    ]
    show(say, lines, report)
    return out
