"""The read API's benchmark (issue 16): history pages/s and point-in-time reads/s.

    python -m bench.reads [--entries 1000000] [--seconds 10]
        [--connections 1]

What is measured. A deployment of its own (prefix `bench-reads-<random>`, 4 shards) whose
PostgreSQL schema is filled by SQL with one balance of `--entries` entries and a
breakpoint every 100 (what the sink writes), and 10% of its commands with a reference;
no engine and no sink run (reads never touch them). One `tally ingress` process serves
signed GETs to wrk on loopback (scripts/wrk/signed_get.lua: every request pre-signed,
each sent once), for `--seconds` per phase: a history page of 100 at a random cursor,
a balance at a random seq, the balances at a random time. First it prints the EXPLAIN
(ANALYZE, BUFFERS) of each query. The schema and the topics the ingress created are
dropped at the end. Not part of `make bench` yet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.report import BenchError, Column, show, table
from core.settings import Settings
from harness.procs import ROOT, IngressProcess
from harness.scratch import deployment, unique_prefix
from ingress import reads, signing
from sinks import pg
from sinks.postgres import at
from topics.shard import shard_of

PARTITIONS = 4
KEY_ID = "bench-reads"
ACCOUNT = "busy"
START_MS = 1_767_225_600_000  # 2026-01-01; entry g is at START_MS + 10 g ms
WRK_SCRIPT = ROOT / "scripts" / "wrk" / "signed_get.lua"
READ_COLUMNS = (
    Column("read", 22),
    Column("reads/s", 10, ",.0f"),
    Column("p50 ms", 9, ".2f"),
    Column("p99 ms", 9, ".2f"),
    Column("statuses", 0, left=True, gap=2),
)


async def fill(conn: asyncpg.Connection, entries: int) -> None:
    shard = shard_of(ACCOUNT, PARTITIONS)
    start = "timestamptz '2026-01-01 00:00:00+00' + g * interval '10 ms'"
    await conn.execute(f"""
        INSERT INTO ledger_entries (shard_id, account, asset, seq, command_id, kind,
            delta_available, delta_held, available, held, at, reference)
        SELECT {shard}, '{ACCOUNT}', 'USD', g, 'c-' || g, 'deposit', g, 0,
            g::numeric * (g + 1) / 2, 0, {start},
            CASE WHEN g % 10 = 0 THEN 'ref-' || g / 10 END
        FROM generate_series(1, {entries}) g""")  # fmt: skip
    await conn.execute(f"""
        INSERT INTO breakpoints SELECT {shard}, '{ACCOUNT}', 'USD', g - 99, g,
            (g::numeric * (g + 1) - (g - 100)::numeric * (g - 99)) / 2, 0,
            (g - 100)::numeric * (g - 99) / 2, 0, g::numeric * (g + 1) / 2, 0, {start}
        FROM generate_series(100, {entries}, 100) g""")  # fmt: skip
    await conn.execute(f"""
        INSERT INTO command_results (shard_id, command_id, account, kind, status, at,
            reference)
        SELECT {shard}, 'c-' || g, '{ACCOUNT}', 'deposit', 'applied', {start},
            CASE WHEN g % 10 = 0 THEN 'ref-' || g / 10 END
        FROM generate_series(1, {entries}) g""")  # fmt: skip
    await conn.execute("ANALYZE ledger_entries, breakpoints, command_results")


async def explain(conn: asyncpg.Connection, entries: int) -> None:
    shard = shard_of(ACCOUNT, PARTITIONS)
    middle = entries // 2
    cases = [
        ("history page", reads._HISTORY_SQL, (shard, ACCOUNT, "USD", middle, 2**63 - 1, 100)),
        ("balance at a seq", reads._AT_SEQ_SQL, (shard, ACCOUNT, "USD", middle + 21)),
        ("balance at a time", reads._AT_TIME_SQL,
         (shard, ACCOUNT, "USD", at(START_MS + 10 * (middle + 21) + 5), 2**63 - 1)),
        ("commands by reference", reads._BY_REFERENCE_SQL, (f"ref-{middle // 10}", 101)),
    ]  # fmt: skip
    for name, sql, args in cases:
        print(f"-- EXPLAIN {name}")
        for row in await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, *args):
            print("   ", row[0])


def write_pool(path: Path, secret: bytes, targets: list[str]) -> None:
    timestamp = str(int(time.time()))
    with open(f"{path}.0", "w") as f:
        for n, target in enumerate(targets):
            nonce = f"r{n:023d}"
            sig = signing.signature(secret, "GET", target, timestamp, nonce, KEY_ID, b"")
            f.write(f"{timestamp} {nonce} {sig} {target}\n")


def wrk(url: str, pool: Path, seconds: int, connections: int) -> dict[str, object]:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
            "-s", str(WRK_SCRIPT), url, "--", str(pool), KEY_ID]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60).stdout
    match = re.search(r"TALLY-RESULT (\{.*\})", out)
    if match is None:
        raise BenchError(f"wrk gave no result:\n{out}")
    result: dict[str, object] = json.loads(match.group(1))
    return result


async def main(entries: int, seconds: int, connections: int) -> None:
    settings = Settings()
    secret = secrets.token_hex(16)
    # The topics are the ingress's to make, at its start; the schema is filled here.
    scratch = deployment(
        settings, unique_prefix("bench-reads", 8), partitions=PARTITIONS, schema=True
    )
    prefix, local = scratch.prefix, scratch.settings
    await scratch.create()
    tmp = Path(tempfile.mkdtemp(prefix="bench-reads-"))
    ingress = IngressProcess(
        settings, prefix=prefix, log_path=tmp / "ingress.log", partitions=PARTITIONS,
        keys={KEY_ID: secret}, ingress_rate_per_s=1_000_000, ingress_rate_burst=1_000_000,
    )  # fmt: skip
    try:
        conn = await pg.connect(local.pg_dsn, prefix)
        try:
            started = time.monotonic()
            await fill(conn, entries)
            print(f"{entries:,} entries written in {time.monotonic() - started:.1f}s")
            await explain(conn, entries)
        finally:
            await conn.close()
        await ingress.start()
        rnd = random.Random(16)
        count = 2000 * seconds * connections  # more than one connection can send
        phases = {
            "history page of 100": [
                f"/v1/accounts/{ACCOUNT}/entries?asset=USD&after_seq="
                f"{rnd.randrange(entries - 100)}&limit=100"
                for _ in range(count)
            ],
            "balance at a seq": [
                f"/v1/accounts/{ACCOUNT}/balances?seq={rnd.randrange(1, entries)}&asset=USD"
                for _ in range(count)
            ],
            "balances at a time": [
                f"/v1/accounts/{ACCOUNT}/balances?at={START_MS + rnd.randrange(10, 10 * entries)}"
                for _ in range(count)
            ],
        }
        rows = []
        for name, targets in phases.items():
            pool = tmp / name.replace(" ", "_")
            write_pool(pool, secret.encode(), targets)
            r = wrk(ingress.url, pool, seconds, connections)
            latency: dict[str, float] = r["latency_us"]  # type: ignore[assignment]
            rate = float(r["responses"]) / (float(r["duration_us"]) / 1e6)  # type: ignore[arg-type]
            rows.append((name, rate, latency["p50"] / 1000, latency["p99"] / 1000,
                         str(r["statuses"])))  # fmt: skip
        title = (
            f"read API on one balance of {entries:,} entries, wrk -t1 -c{connections} -d{seconds}s"
        )
        show(print, [title, *table(READ_COLUMNS, rows)])
    finally:
        await ingress.stop()
        await scratch.drop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=1)
    a = parser.parse_args()
    asyncio.run(main(a.entries, a.seconds, a.connections))
