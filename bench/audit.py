"""`tally bench audit`: how long `tally audit` takes on a deployment of N balances
(1,000,000 by default), and the memory it needs.

Method. Pushing N balances through the engine and the sinks would measure those, for
long; instead the bench writes a deployment straight into every store, consistent, as
the engine and the sinks would have left it. Balance b (of N, over N/2 accounts with a
USD and an EUR balance each) has 1 to 3 entries: a deposit, a withdrawal, a hold. Then:
- PostgreSQL, by COPY: `ledger_entries`, a breakpoint at seq 2 (what the sink writes
  with `breakpoint_every` = 2), the `balances` row; then ANALYZE, as autovacuum would;
- Redis, by the sink's own write script: each balance hash and account asset set;
- the engine's changelog topic: each balance and account record in the engine's key and
  value encoding (`streams.store`, `streams.state`); an engine worker then starts on an
  empty state directory and rebuilds its tables from the changelog before it serves.
Then `tally audit` runs as a child process, as an operator runs it. The bench times it
from start to exit, takes its peak RSS from the kernel (`os.wait4`), and requires exit
status 0. The topics, the schema, the Redis keys and the state directory are removed
afterwards. `--skip-engine` leaves the engine out of both (and says so).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer

from bench.report import pair, show
from core.settings import Settings, child_env
from harness.procs import ROOT, EngineProcess
from harness.scratch import Topics, scratch, unique_prefix
from sinks import pg, redis_client
from sinks.redis_store import LWW_SCRIPT, add_balance, script_call
from streams.state import AccountState, BalanceState
from streams.store import account_key
from streams.store import balance_key as state_key
from topics.names import changelog_name, engine_group
from topics.producer import durable_producer
from topics.shard import shard_of

BAR_S = 60.0
BAR_BALANCES = 1_000_000
ASSETS = ("USD", "EUR")
# Balances generated and written per step: what the bench itself holds at once.
chunk_balances = 50_000
redis_keys_per_call = 5000
audit_timeout_s = 600.0
_AT = datetime(2025, 1, 1, tzinfo=UTC)
_ENTRY_COLUMNS = ["shard_id", "account", "asset", "seq", "command_id", "kind",
                  "delta_available", "delta_held", "available", "held", "at"]  # fmt: skip
_BREAKPOINT_COLUMNS = ["shard_id", "account", "asset", "from_seq", "to_seq",
                       "delta_available", "delta_held", "available_before", "held_before",
                       "available_after", "held_after", "created_at"]  # fmt: skip
_BALANCE_COLUMNS = ["shard_id", "account", "asset", "available", "held", "seq", "updated_at"]


@dataclass
class Chunk:
    """One step's rows for every store."""

    entries: list[tuple[Any, ...]] = field(default_factory=list)
    breakpoints: list[tuple[Any, ...]] = field(default_factory=list)
    balances: list[tuple[Any, ...]] = field(default_factory=list)
    changelog: list[tuple[bytes, bytes, int]] = field(default_factory=list)
    # shard -> (keys, args) for the Redis sink's script
    redis: dict[int, tuple[list[str], list[bytes]]] = field(default_factory=dict)


def account_of(b: int) -> str:
    # Not zero-padded: "au1" is a prefix of "au10", the case where the engine's key
    # order ("au1|USD" after "au10|USD") differs from (account, asset) order.
    return f"au{b // len(ASSETS)}"


def chunk(start: int, stop: int, partitions: int, prefix: str) -> Chunk:
    """Balances start..stop-1 as the stores of deployment `prefix` hold them."""
    out = Chunk()
    encode = msgspec.json.encode
    account_record = encode(AccountState(assets=ASSETS))
    for b in range(start, stop):
        account, asset = account_of(b), ASSETS[b % len(ASSETS)]
        shard = shard_of(account, partitions)
        deposit, withdrawal, hold = 1000 + b % 997, 1 + b % 500, 1 + b % 100
        steps = [("deposit", deposit, 0), ("withdraw", -withdrawal, 0), ("hold", -hold, hold)]
        available = held = 0
        for seq, (kind, d_available, d_held) in enumerate(steps[: 1 + b % 3], start=1):
            available += d_available
            held += d_held
            out.entries.append((shard, account, asset, seq, f"b{b}-{seq}", kind,
                                d_available, d_held, available, held, _AT))  # fmt: skip
            if seq == 2:
                out.breakpoints.append((shard, account, asset, 1, 2, deposit - withdrawal, 0,
                                        0, 0, available, held, _AT))  # fmt: skip
        seq = 1 + b % 3
        out.balances.append((shard, account, asset, available, held, seq, _AT))
        call = out.redis.setdefault(shard, ([], []))
        add_balance(call, prefix, shard, account, asset, available, held, seq)
        state = encode(BalanceState(available, held, seq))
        out.changelog.append((state_key(account, asset), state, shard))
        if b % len(ASSETS) == 0:
            out.changelog.append((account_key(account), account_record, shard))
    return out


class Writer:
    """Writes chunks into PostgreSQL, Redis and the changelog of one deployment."""

    def __init__(self, settings: Settings, app_id: str, with_engine: bool) -> None:
        self.settings = settings
        self.app_id = app_id
        self.with_engine = with_engine
        self.conn: Any = None
        self.redis: Any = None
        self.script: Any = None
        self.producer: AIOKafkaProducer | None = None

    async def open(self) -> None:
        """Connect to every store (the schema and the changelog topic exist)."""
        s = self.settings
        # Money columns are numeric: written with the sink's own codec, as the sink does.
        self.conn = await pg.connect(s.pg_dsn, s.topic_prefix, exact_money=True)
        self.redis = redis_client.connect_to(s)
        self.script = self.redis.register_script(LWW_SCRIPT)
        if self.with_engine:
            self.producer = durable_producer(
                s.kafka_bootstrap,
                linger_ms=20,
                max_batch_size=1024 * 1024,
            )
            await self.producer.start()

    async def close(self) -> None:
        producer, conn, client = self.producer, self.conn, self.redis
        self.producer = self.conn = self.redis = None
        if producer is not None:
            await producer.stop()
        if conn is not None:
            await conn.close()
        if client is not None:
            await client.aclose()

    async def write(self, c: Chunk) -> None:
        await asyncio.gather(self._pg(c), self._redis(c), self._changelog(c))

    async def _pg(self, c: Chunk) -> None:
        copy = self.conn.copy_records_to_table
        async with self.conn.transaction():
            await copy("ledger_entries", records=c.entries, columns=_ENTRY_COLUMNS)
            await copy("breakpoints", records=c.breakpoints, columns=_BREAKPOINT_COLUMNS)
            await copy("balances", records=c.balances, columns=_BALANCE_COLUMNS)

    async def _redis(self, c: Chunk) -> None:
        calls = []
        step = redis_keys_per_call
        for shard, (keys, args) in c.redis.items():
            for i in range(0, len(args), step):
                # Seeded straight into Redis, not by a sink: no progress to check.
                head_keys, head_args = script_call(self.settings.topic_prefix, shard, 0, 0)
                calls.append(
                    (head_keys + keys[2 * i : 2 * (i + step)], head_args + args[i : i + step])
                )
        await redis_client.run_script(self.redis, self.script, calls)

    async def _changelog(self, c: Chunk) -> None:
        if self.producer is None:
            return
        topic = changelog_name(self.app_id)
        sent = [
            await self.producer.send(topic, value, key=key, partition=shard)
            for key, value, shard in c.changelog
        ]
        await asyncio.gather(*sent)

    async def analyze(self) -> None:
        await self.conn.execute("ANALYZE balances, ledger_entries, breakpoints")


def chunks(n: int, partitions: int, prefix: str) -> Iterator[Chunk]:
    for start in range(0, n, chunk_balances):
        yield chunk(start, min(n, start + chunk_balances), partitions, prefix)


@dataclass
class AuditRun:
    seconds: float
    own_seconds: float | None
    peak_rss_mb: float
    exit_code: int
    summary: str


# Starts the audit and reports the kernel's account of it (os.wait4). Not started from
# the bench itself: Linux counts the memory of the image a process was started from in
# its peak RSS (ru_maxrss), and the bench holds the generated data; this launcher is a
# fresh interpreter of a few MB. argv: stdout file, stderr file, command...
_LAUNCHER = """
import json, os, subprocess, sys, time
from topics.names import engine_group, engine_topic_specs
with open(sys.argv[1], "wb") as out, open(sys.argv[2], "wb") as err:
    started = time.monotonic()
    proc = subprocess.Popen(sys.argv[3:], stdout=out, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
print(json.dumps({"seconds": seconds, "maxrss_kb": usage.ru_maxrss,
                  "exit_code": os.waitstatus_to_exitcode(status)}))
"""


def run_audit(settings: Settings, engine_url: str | None, workdir: Path) -> AuditRun:
    """`tally audit` as a child process: wall time, its peak RSS, its exit code."""
    args = ["--skip-engine"] if engine_url is None else ["--engine-url", engine_url]
    workdir.mkdir(parents=True, exist_ok=True)
    out, err = workdir / "audit.out", workdir / "audit.err"
    launched = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, str(out), str(err),
         sys.executable, "-m", "tally.cli", "audit", *args],
        cwd=ROOT, env=child_env(settings), capture_output=True, check=True,
        timeout=audit_timeout_s,
    )  # fmt: skip
    numbers = json.loads(launched.stdout)
    summary = out.read_text(errors="replace") + err.read_text(errors="replace")
    own = re.search(r"balances in ([\d.]+)s", summary)
    return AuditRun(
        seconds=numbers["seconds"],
        own_seconds=float(own.group(1)) if own else None,
        peak_rss_mb=numbers["maxrss_kb"] / 1024,  # KiB on Linux
        exit_code=numbers["exit_code"],
        summary=summary,
    )


async def write(
    settings: Settings, app_id: str, balances: int, with_engine: bool, say: Callable[[str], None]
) -> None:
    """Write the deployment's `balances` into every store (its schema and topics exist)."""
    where = "PostgreSQL, Redis" + (" and the engine's changelog" if with_engine else "")
    say(f"[audit] writing {balances:,} balances ({settings.partitions} shards) to {where}")
    started = time.monotonic()
    writer = Writer(settings, app_id, with_engine)
    try:
        await writer.open()
        for c in chunks(balances, settings.partitions, settings.topic_prefix):
            await writer.write(c)
        await writer.analyze()
    finally:
        await writer.close()
    say(f"[audit] written in {time.monotonic() - started:.1f}s")


async def run(
    settings: Settings,
    *,
    balances: int,
    workdir: Path,
    with_engine: bool = True,
    say: Callable[[str], None] = print,
) -> bool:
    """Build the deployment, audit it, print the numbers, clean up; True if the audit
    agreed (exit 0)."""
    prefix = unique_prefix("bench-audit")
    data_dir = workdir / prefix
    audit_dir = workdir / f"{prefix}-audit"
    engine: EngineProcess | None = None
    topics: Topics = "engine" if with_engine else "none"
    async with scratch(settings, prefix, topics=topics, schema=True, data_dir=data_dir) as dep:
        local = dep.settings
        try:
            await write(local, engine_group(local), balances, with_engine, say)
            engine_url = None
            if with_engine:
                started = time.monotonic()
                engine = EngineProcess(
                    settings, prefix=prefix, data_dir=data_dir, partitions=local.partitions
                )
                await engine.start()  # ready once every shard is rebuilt from the changelog
                engine_url = f"http://127.0.0.1:{engine.port}"
                took = time.monotonic() - started
                say(f"[audit] engine worker rebuilt its tables in {took:.1f}s")
            say("[audit] running `tally audit` as a child process")
            result = await asyncio.to_thread(run_audit, local, engine_url, audit_dir)
        finally:
            if engine is not None:
                await engine.stop()
            _remove(audit_dir, workdir / f"{prefix}.log")
    report(result, balances, with_engine, say)
    return result.exit_code == 0


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def report(result: AuditRun, balances: int, with_engine: bool, say: Callable[[str], None]) -> None:
    show(say, [result.summary.rstrip()])
    stores = "PostgreSQL + Redis + engine" if with_engine else "PostgreSQL + Redis (--skip-engine)"
    lines = [
        f"tally audit benchmark ({stores})",
        pair("balances", f"{balances:,}"),
        pair("wall time (process start to exit)", f"{result.seconds:.1f}s"),
    ]
    if result.own_seconds is not None:
        lines.append(pair("of which auditing", f"{result.own_seconds:.1f}s"))
    lines += [
        pair("balances/s (wall)", f"{balances / result.seconds:,.0f}"),
        pair("peak RSS of the audit process", f"{result.peak_rss_mb:,.0f} MB"),
        pair("exit status", result.exit_code),
    ]
    if balances >= BAR_BALANCES:
        met = result.seconds < BAR_S and result.exit_code == 0
        verdict = "met" if met else "NOT met"
    else:
        verdict = f"n/a (ran {balances:,})"
    lines.append(pair("bar: 1M balances < 60 s", verdict))
    if not with_engine:
        lines.append("NOTE: the engine was left out (--skip-engine): its tables were not compared.")
    show(say, lines)


def main(settings: Settings, *, balances: int, with_engine: bool) -> int:
    workdir = Path(settings.data_dir).resolve() / "bench"
    ok = asyncio.run(run(settings, balances=balances, workdir=workdir, with_engine=with_engine))
    return 0 if ok else 1
