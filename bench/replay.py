"""`tally bench replay`: how fast `tally replay` rebuilds each store from empty.

Method. N synthetic result events (one balance entry each, over N/20 accounts, seq
increasing per account: the generator of `tally bench sinks`) are produced to a fresh
deployment's events topic. Then the replay of `tally replay --target T` runs in this
process for Redis and then PostgreSQL (PostgreSQL keeps working after its writes, with
autovacuum and the checkpoint, which on two shared cores would be charged to whatever
ran next), each from offset 0 into an empty store, with the default batch settings.
The time is the replay's own: from the start of its consumer to the end of the last
write (the checks before it, a second or less, excluded). Each store is then counted:
every event must be there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.events import result_events
from bench.report import Column, show, table, write_report
from core.settings import Settings
from harness.procs import produce
from harness.scratch import scratch, unique_prefix
from replay.run import Replay
from sinks import pg, verify
from topics.names import deployment_topics, schema_name

REPLAY_COLUMNS = (
    Column("store", 12),
    Column("seconds", 10, ".1f"),
    Column("events/s", 12, ",.0f"),
    Column("entries/s", 12, ",.0f"),
)


@dataclass
class ReplayResult:
    target: str
    events: int
    entries: int
    seconds: float
    events_per_s: float
    entries_per_s: float


async def _stored(settings: Settings, target: str) -> int:
    """Entries in the store: ledger rows (PostgreSQL), the summed seqs (Redis)."""
    if target == "postgres":
        conn = await pg.connect(settings.pg_dsn, schema_name(settings))
        try:
            return int(await conn.fetchval("SELECT count(*) FROM ledger_entries"))
        finally:
            await conn.close()
    balances = await verify.redis_balances(
        settings.redis_url, settings.topic_prefix, cluster=settings.redis_cluster
    )
    return sum(seq for _, _, seq in balances.values())


async def _replay(settings: Settings, target: str, count: int) -> ReplayResult:
    summary = await Replay(settings, target).run()
    if not summary.completed or summary.events != count:
        raise BenchError(f"replay {target}: {summary.events} of {count} events")
    if (stored := await _stored(settings, target)) != count:
        raise BenchError(f"replay {target}: the store holds {stored} of {count} entries")
    return ReplayResult(
        target=target,
        events=summary.events,
        entries=summary.entries,
        seconds=summary.seconds,
        events_per_s=summary.events_per_s,
        entries_per_s=summary.entries_per_s,
    )


async def run(
    settings: Settings,
    *,
    count: int,
    report: Path,
    say: Callable[[str], Any] = print,
) -> dict[str, object]:
    prefix = unique_prefix("bench-replay")
    results = []
    async with scratch(settings, prefix, topics="deployment", schema=True) as deployment:
        local = deployment.settings
        accounts = max(100, count // 20)
        say(f"[replay] producing {count:,} result events over {accounts:,} accounts to {prefix}")
        events = result_events(count, accounts, int(time.time() * 1000))
        topic = deployment_topics(local).events.name
        await produce(local.kafka_bootstrap, topic, [(k, v, None) for k, v in events])
        del events  # not kept alive during the replays (every full GC would walk them)
        for target in ("redis", "postgres"):
            say(f"[replay] tally replay --target {target}: {count:,} events into an empty store")
            results.append(await _replay(local, target, count))
    out: dict[str, object] = {
        "events": count,
        "partitions": local.partitions,
        "batch_size": local.sink_batch_size,
        "linger_ms": local.sink_linger_ms,
        "replays": [asdict(r) for r in results],
    }
    await asyncio.to_thread(write_report, report, out)
    rows = [(r.target, r.seconds, r.events_per_s, r.entries_per_s) for r in results]
    title = f"replay of {count:,} events from offset 0 into an empty store, one process"
    show(say, [title, *table(REPLAY_COLUMNS, rows)], report)
    return out
