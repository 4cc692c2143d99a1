"""`tally bench sinks`: how fast each sink drains a pre-filled events topic, and how long
an event takes to become visible in each store once the sinks are caught up.

Method. N synthetic result events (one balance entry each, over N/20 accounts, seq
increasing per account) are produced to a fresh deployment's events topic. Each sink
then runs as `tally sink --processes P` (P = 2 unless told otherwise), as deployed,
from offset 0 with its default batch settings, Redis first, then PostgreSQL.
Throughput is N over the time from the first write visible in the store to the last
event of every partition being visible (the store is read every 20 ms; a sink writes a
partition in order). Then both sinks run in this process, resume where the processes
stopped, and with both caught up paced events (200/s for 10 s) carry their send time:
an event's lag is the time from that send to the end of the store write that contains
it (PostgreSQL's commit, Redis's pipeline), i.e. the moment a reader could see it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer

from bench.events import result_events
from bench.report import BenchError, Column, pct, show, table, write_report
from core.settings import Settings, child_env
from harness.procs import produce
from harness.scratch import scratch, unique_prefix
from sinks import pg, redis_client, service, verify
from sinks.redis_store import balance_key
from sinks.runner import Batch, SinkRunner
from topics.codec import encode
from topics.names import deployment_topics, schema_name
from topics.schema import Entry, Result, Status
from topics.shard import shard_of

lag_rate_per_s = 200
lag_seconds = 10
drain_timeout_s = 600.0
poll_s = 0.02
SINK_COLUMNS = (
    Column("sink", 12),
    Column("entries/s", 12, ",.0f"),
    Column("lag p50 ms", 12, ".1f"),
    Column("lag p99 ms", 12, ".1f"),
    Column("samples", 9),
)


@dataclass
class SinkResult:
    target: str
    events: int
    entries_per_s: float
    lag_p50_ms: float
    lag_p99_ms: float
    lag_samples: int


def _watch_keys(
    count: int, accounts: int, partitions: int
) -> tuple[list[tuple[int, str, int]], list[tuple[int, str, int]]]:
    """Per partition, the (shard, account, seq) of its first and of its last event. A sink
    writes a partition in order, so the last one visible means the partition is done."""
    first: dict[int, tuple[int, str, int]] = {}
    last: dict[int, tuple[int, str, int]] = {}
    seqs = [0] * accounts
    for i in range(count):
        a = i % accounts
        seqs[a] += 1
        account = f"bench-{a}"
        shard = shard_of(account, partitions)
        first.setdefault(shard, (shard, account, seqs[a]))
        last[shard] = (shard, account, seqs[a])
    return list(first.values()), list(last.values())


class _Watch:
    """Reads the stored seq of a few balances, over one connection for the whole drain."""

    def __init__(self, settings: Settings, target: str) -> None:
        self.settings = settings
        self.target = target
        self.conn: Any = None
        self.client: Any = None

    async def open(self) -> None:
        if self.target == "postgres":
            self.conn = await pg.connect(self.settings.pg_dsn, schema_name(self.settings))
        else:
            self.client = redis_client.connect_to(self.settings)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        if self.client is not None:
            await self.client.aclose()

    async def seqs(self, keys: list[tuple[int, str, int]]) -> list[int]:
        """The stored seq of each watched balance (0 when not there yet)."""
        if self.conn is not None:
            rows = await self.conn.fetch(
                "SELECT shard_id, account, seq FROM balances"
                " WHERE (shard_id, account) IN (SELECT * FROM unnest($1::int[], $2::text[]))"
                " AND asset = 'USD'",
                [k[0] for k in keys],
                [k[1] for k in keys],
            )
            found = {(r["shard_id"], r["account"]): r["seq"] for r in rows}
            return [found.get((k[0], k[1]), 0) for k in keys]
        async with self.client.pipeline(transaction=False) as pipe:
            for shard, account, _ in keys:
                pipe.hget(balance_key(self.settings.topic_prefix, shard, account, "USD"), "seq")
            values = await pipe.execute()
        return [int(v) if v is not None else 0 for v in values]


async def _drain(
    settings: Settings, target: str, count: int, accounts: int, processes: int
) -> float:
    """Run `tally sink TARGET --processes N` from offset 0 until the last event of every
    partition is visible in the store; entries/s from the first visible write."""
    first, last = _watch_keys(count, accounts, settings.partitions)
    env = child_env(msgspec.structs.replace(settings, log_level="WARNING"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tally.cli", "sink", target, "--processes", str(processes),
        env=env,
    )  # fmt: skip
    watch = _Watch(settings, target)
    await watch.open()
    try:
        deadline = time.monotonic() + drain_timeout_s
        started: float | None = None
        while True:
            if proc.returncode is not None:
                raise BenchError(f"tally sink {target} exited {proc.returncode}")
            if time.monotonic() > deadline:
                raise BenchError(f"tally sink {target} did not drain in {drain_timeout_s}s")
            now = time.perf_counter()
            if started is None and any(await watch.seqs(first)):
                started = now
            if started is not None:
                seqs = await watch.seqs(last)
                if all(got >= k[2] for got, k in zip(seqs, last, strict=True)):
                    return count / max(now - started, 1e-9)
            await asyncio.sleep(poll_s)
    finally:
        await watch.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()


async def _lags(
    settings: Settings, runners: list[SinkRunner], accounts: int
) -> dict[str, list[float]]:
    lags: dict[str, list[float]] = {r.store.name: [] for r in runners}
    sent: dict[str, float] = {}
    for runner in runners:

        def on_batch(batch: Batch, name: str = runner.store.name) -> None:
            now = time.time() * 1000
            for _, result in batch.events:
                if result.command_id in sent:
                    lags[name].append(now - sent[result.command_id])

        runner.on_batch = on_batch
    topic = deployment_topics(settings).events.name
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        started = time.monotonic()
        for i in range(lag_rate_per_s * lag_seconds):
            due = started + i / lag_rate_per_s
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            account = f"lag-{i % 97}"
            entry = Entry(
                account=account, asset="USD", seq=i // 97 + 1, available=1, held=0,
                delta_available=1, delta_held=0,
            )  # fmt: skip
            command_id = f"lag-{i}"
            now_ms = time.time() * 1000
            result = Result(
                command_id=command_id, account=account, kind="deposit", status=Status.APPLIED,
                entries=[entry], at_ms=int(now_ms),
            )  # fmt: skip
            sent[command_id] = now_ms
            await producer.send(
                topic, encode(result), key=account.encode(),
                partition=shard_of(account, settings.partitions),
            )  # fmt: skip
    finally:
        await producer.stop()
    # Polled, not awaited on an event: the callbacks run inside the sinks' loops.
    for _ in range(600):
        if all(len(v) >= len(sent) for v in lags.values()):
            break
        await asyncio.sleep(0.1)
    return lags


async def _prefill(
    settings: Settings, count: int, accounts: int, say: Callable[[str], None]
) -> None:
    """Produce `count` result events to the deployment's events topic. (A function of
    its own so that the events are not kept alive during the drains: 400,000 live
    objects make every full garbage collection in the sinks' loop walk them.)"""
    topic = deployment_topics(settings).events.name
    say(f"[sinks] producing {count:,} result events over {accounts:,} accounts to {topic}")
    events = result_events(count, accounts, int(time.time() * 1000))
    # No partition given: the producer's murmur2 of the key is the account's shard.
    await produce(settings.kafka_bootstrap, topic, [(key, value, None) for key, value in events])


async def _measure(
    settings: Settings, count: int, accounts: int, processes: int, say: Callable[[str], None]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each sink's drain rate (entries/s) as its own processes, then both sinks' lags in
    this process: (rates, lags) by store name."""
    # Each sink as its own process, as it is deployed; Redis first: PostgreSQL keeps
    # working after its drain (autovacuum of the new rows, the checkpoint), which on
    # two shared cores would be charged to whatever runs next.
    rates = {}
    runners = [service.runner_for(settings, target) for target in ("redis", "postgres")]
    tasks = []
    try:
        for runner in runners:
            name = runner.store.name
            say(
                f"[sinks] tally sink {name} --processes {processes}: "
                f"draining {count:,} events from offset 0"
            )
            rates[name] = await _drain(settings, name, count, accounts, processes)
        # Lag: the same sinks in this process, resuming where the processes stopped.
        tasks = [asyncio.create_task(r.run()) for r in runners]
        if not await verify.wait_drained(runners, timeout_s=120):
            raise BenchError("the sinks did not catch up before the lag phase")
        say(f"[sinks] lag at {lag_rate_per_s}/s for {lag_seconds}s, both sinks caught up")
        lags = await _lags(settings, runners, accounts)
    finally:
        for runner in runners:
            runner.stop()
        await asyncio.gather(*tasks)
    return rates, lags


async def run(
    settings: Settings,
    *,
    count: int,
    processes: int,
    report: Path,
    say: Callable[[str], None] = print,
) -> dict[str, object]:
    accounts = max(100, count // 20)
    prefix = unique_prefix("bench-sinks")
    async with scratch(settings, prefix, topics="deployment", schema=True) as deployment:
        local = deployment.settings
        await _prefill(local, count, accounts, say)
        rates, lags = await _measure(local, count, accounts, processes, say)
    results = [
        SinkResult(
            target=name,
            events=count,
            entries_per_s=rates[name],
            lag_p50_ms=pct(lags[name], 50),
            lag_p99_ms=pct(lags[name], 99),
            lag_samples=len(lags[name]),
        )
        for name in rates
    ]
    out: dict[str, object] = {
        "events": count,
        "sink_processes": processes,
        "partitions": local.partitions,
        "batch_size": local.sink_batch_size,
        "linger_ms": local.sink_linger_ms,
        "sinks": [asdict(x) for x in results],
    }
    await asyncio.to_thread(write_report, report, out)
    rows = [(x.target, x.entries_per_s, x.lag_p50_ms, x.lag_p99_ms, x.lag_samples) for x in results]
    show(say, [f"sinks drained with --processes {processes}", *table(SINK_COLUMNS, rows)], report)
    return out
