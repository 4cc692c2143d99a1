"""Read the stores back and compare them: what the demo and the tests use to show that
PostgreSQL, Redis and the engine agree, and that the ledger reproduces every balance."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sinks import pg, redis_client
from sinks.pg import quote

# (account, asset) -> (available, held, seq)
Balances = dict[tuple[str, str], tuple[int, int, int]]


async def _fetch(dsn: str, schema: str, query: str) -> list[Any]:
    conn = await pg.connect(dsn, schema)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def pg_balances(dsn: str, schema: str) -> Balances:
    # Money columns are numeric (any size): asyncpg gives Decimals, read back as ints.
    rows = await _fetch(dsn, schema, "SELECT account, asset, available, held, seq FROM balances")
    return {
        (r["account"], r["asset"]): (int(r["available"]), int(r["held"]), r["seq"]) for r in rows
    }


async def ledger_balances(dsn: str, schema: str) -> Balances:
    """Every balance recomputed from `ledger_entries` alone (seq = the number of entries,
    which also proves there is no gap: seqs start at 1)."""
    rows = await _fetch(
        dsn,
        schema,
        "SELECT account, asset, sum(delta_available) AS a, sum(delta_held) AS h,"
        " count(*) AS n, max(seq) AS s FROM ledger_entries GROUP BY account, asset",
    )
    return {
        (r["account"], r["asset"]): (int(r["a"]), int(r["h"]), r["s"] if r["n"] == r["s"] else -1)
        for r in rows
    }


async def breakpoint_balances(dsn: str, schema: str) -> Balances:
    """Every balance as its last breakpoint plus the entries after it."""
    rows = await _fetch(
        dsn,
        schema,
        """
        WITH last AS (
            SELECT DISTINCT ON (shard_id, account, asset) shard_id, account, asset, to_seq,
                available_after, held_after
            FROM breakpoints ORDER BY shard_id, account, asset, to_seq DESC
        )
        SELECT e.account, e.asset,
            coalesce(max(l.available_after), 0) + coalesce(
              sum(e.delta_available) FILTER (WHERE e.seq > coalesce(l.to_seq, 0)), 0) AS a,
            coalesce(max(l.held_after), 0) + coalesce(
              sum(e.delta_held) FILTER (WHERE e.seq > coalesce(l.to_seq, 0)), 0) AS h,
            max(e.seq) AS s
        FROM ledger_entries e
        LEFT JOIN last l ON l.shard_id = e.shard_id AND l.account = e.account
            AND l.asset = e.asset
        GROUP BY e.account, e.asset
        """,
    )
    return {(r["account"], r["asset"]): (int(r["a"]), int(r["h"]), r["s"]) for r in rows}


async def redis_balances(url: str, prefix: str, *, cluster: bool = False) -> Balances:
    """Every balance hash of the deployment (on a cluster, SCAN covers every master)."""
    client: Any = redis_client.connect(url, cluster=cluster)
    out: Balances = {}
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*:balance:*", count=1000)]
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            async with client.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.hgetall(key)
                values = await pipe.execute()
            for key, value in zip(chunk, values, strict=True):
                account, asset = key.decode().split(":balance:", 1)[1].rsplit(":", 1)
                out[(account, asset)] = (
                    int(value[b"available"]),
                    int(value[b"held"]),
                    int(value[b"seq"]),
                )
    finally:
        await client.aclose()
    return out


@dataclass
class Comparison:
    name: str
    compared: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def line(self) -> str:
        mark = "  ok" if self.ok else "FAIL"
        text = f"  [{mark}] {self.name}: {self.compared} balances"
        if self.mismatches:
            text += f", {len(self.mismatches)} differ (first: {self.mismatches[0]})"
        return text


def compare(name: str, reference: Mapping[Any, Any], other: Mapping[Any, Any]) -> Comparison:
    result = Comparison(name, compared=len(reference))
    for key in sorted(set(reference) | set(other)):
        if reference.get(key) != other.get(key):
            result.mismatches.append(f"{key}: {reference.get(key)} vs {other.get(key)}")
    return result


async def wait_drained(runners: list[Any], *, timeout_s: float, quiet_s: float = 1.0) -> bool:
    """Wait until every sink has no lag and has written nothing new for `quiet_s`."""
    deadline = time.monotonic() + timeout_s
    last = [-1] * len(runners)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        written = [r.written_events for r in runners]
        lags = [await r.lag() for r in runners]
        if (
            written != last
            or any(lags)
            or any(r.consumer is None or not r.consumer.assignment() for r in runners)
        ):
            last = written
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return True
        await asyncio.sleep(0.1)
    return False


async def agreement(
    dsn: str, schema: str, redis_url: str, prefix: str, engine: Balances, *, cluster: bool = False
) -> list[Comparison]:
    """PostgreSQL, Redis, the ledger and the breakpoints, each against the engine's
    tables. Engine balances that never changed (an overdraft limit set on an empty
    balance, seq 0) have no event and are left out."""
    reference = {k: v for k, v in engine.items() if v[2] > 0}
    return [
        compare("PostgreSQL balances = engine tables", reference, await pg_balances(dsn, schema)),
        compare(
            "Redis = engine tables",
            reference,
            await redis_balances(redis_url, prefix, cluster=cluster),
        ),
        compare(
            "ledger_entries sums = engine tables", reference, await ledger_balances(dsn, schema)
        ),
        compare(
            "breakpoints + later entries = engine tables",
            reference,
            await breakpoint_balances(dsn, schema),
        ),
    ]


async def drop(
    dsn: str, schema: str, redis_url: str, prefix: str, *, cluster: bool = False
) -> None:
    """Remove a deployment's PostgreSQL schema and Redis keys (the demo's clean-up). (On a
    cluster, the multi-key DEL is split by slot by the client.)"""
    conn = await pg.connect(dsn, None)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote(schema)} CASCADE")
    finally:
        await conn.close()
    client: Any = redis_client.connect(redis_url, cluster=cluster)
    try:
        batch = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.delete(*batch)
                batch = []
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


def event_balances(results: Any) -> Balances:
    """The last state of every balance as the result events tell it (a Collector's
    Results): what the engine's tables hold, by the engine's own account."""
    return final_balances(result for group in results.by_id.values() for result in group)


def final_balances(results: Iterable[Any]) -> Balances:
    """The last state (highest seq) of every balance the given result events touched."""
    out: Balances = {}
    for result in results:
        for e in result.entries:
            key = (e.account, e.asset)
            if key not in out or out[key][2] < e.seq:
                out[key] = (e.available, e.held, e.seq)
    return out


async def pg_dump(dsn: str, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the projection tables, in key order (sink_offsets aside)."""
    order = {
        "balances": "shard_id, account, asset",
        "ledger_entries": "shard_id, account, asset, seq",
        "command_results": "shard_id, account, command_id",
        "breakpoints": "shard_id, account, asset, to_seq",
    }
    return {
        table: [tuple(r) for r in await _fetch(dsn, schema, f"SELECT * FROM {table} ORDER BY {by}")]
        for table, by in order.items()
    }


async def redis_dump(url: str, prefix: str, *, cluster: bool = False) -> dict[bytes, Any]:
    client: Any = redis_client.connect(url, cluster=cluster)
    try:
        out: dict[bytes, Any] = {}
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            kind = await client.type(key)
            if kind == b"hash":
                out[key] = sorted((await client.hgetall(key)).items())
            elif kind == b"set":
                out[key] = sorted(await client.smembers(key))
        return dict(sorted(out.items()))
    finally:
        await client.aclose()
