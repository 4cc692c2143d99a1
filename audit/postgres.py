"""The audit's PostgreSQL side: the ledger recomputed per shard, in the engine's key order,
through a server-side cursor, and the totals."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncGenerator
from typing import Any

import asyncpg

from audit.rows import (
    AuditError,
    LedgerRow,
    connect_timeout_s,
    pg_work_mem,
    shards_in_flight,
    sort_key,
)
from sinks import pg
from topics.money import Flow, flow_of

# One shard, one row per balance known to `balances` or `ledger_entries`, in the engine's
# key order. The last breakpoint's `*_after` plus the later entries is the balance; the
# count, first and last seq prove the seqs are 1..n; the sums of all entries check the
# breakpoint. Money columns and their sums are numeric, of any size: never cast to a
# fixed width (lifetime flows pass 2^63 long before any balance does); read as ints.
SHARD_SQL = """
WITH last AS (
    SELECT DISTINCT ON (account, asset) account, asset, to_seq, available_after, held_after
    FROM breakpoints WHERE shard_id = $1
    ORDER BY account, asset, to_seq DESC
), ledger AS (
    SELECT e.account, e.asset,
        (coalesce(max(l.available_after), 0) + coalesce(sum(e.delta_available)
            FILTER (WHERE l.to_seq IS NULL OR e.seq > l.to_seq), 0)) AS available,
        (coalesce(max(l.held_after), 0) + coalesce(sum(e.delta_held)
            FILTER (WHERE l.to_seq IS NULL OR e.seq > l.to_seq), 0)) AS held,
        max(e.seq) AS last_seq, count(*) AS entries, min(e.seq) AS first_seq,
        max(l.to_seq) AS breakpoint_seq,
        sum(e.delta_available) AS sum_available, sum(e.delta_held) AS sum_held
    FROM ledger_entries e LEFT JOIN last l ON l.account = e.account AND l.asset = e.asset
    WHERE e.shard_id = $1
    GROUP BY e.account, e.asset
), bal AS (
    SELECT account, asset, available, held, seq FROM balances WHERE shard_id = $1
)
SELECT coalesce(b.account, g.account) AS account, coalesce(b.asset, g.asset) AS asset,
    b.available, b.held, b.seq, g.available, g.held, g.last_seq, g.entries, g.first_seq,
    g.breakpoint_seq, g.sum_available, g.sum_held
FROM bal b FULL JOIN ledger g ON g.account = b.account AND g.asset = b.asset
ORDER BY (coalesce(b.account, g.account) || '|' || coalesce(b.asset, g.asset)) COLLATE "C"
"""

# The facts `topics.money` needs, summed from the ledger: per asset and kind, and of each
# capture whether it paid out (named no payee). A capture to an account emitted a credit
# "<payer>/<capture id>/credit", and that credit is in the ledger, or the refund of it
# ("<credit>/refund", topics.ids) when it could not be applied; a capture with neither
# paid out.
FLOWS_SQL = """
WITH captures AS (
    SELECT DISTINCT account, command_id FROM ledger_entries WHERE kind = 'capture'
), paid AS (
    SELECT DISTINCT c.account, c.command_id FROM captures c
    JOIN ledger_entries e ON e.kind IN ('credit', 'refund')
        AND split_part(e.command_id, '/', 1) = c.account
        AND split_part(e.command_id, '/', 2) = c.command_id
)
SELECT e.asset, e.kind, e.kind = 'capture' AND p.account IS NULL AS pays_out,
    sum(e.delta_available + e.delta_held) AS total
FROM ledger_entries e
LEFT JOIN paid p ON e.kind = 'capture' AND p.account = e.account AND p.command_id = e.command_id
GROUP BY 1, 2, 3
"""

# Of these Redis keys' balances, the ones PostgreSQL knows nothing about.
UNKNOWN_SQL = """
SELECT k.account, k.asset FROM unnest($2::text[], $3::text[]) AS k(account, asset)
WHERE NOT EXISTS (SELECT 1 FROM balances b
                  WHERE b.shard_id = $1 AND b.account = k.account AND b.asset = k.asset)
  AND NOT EXISTS (SELECT 1 FROM ledger_entries e
                  WHERE e.shard_id = $1 AND e.account = k.account AND e.asset = k.asset)
"""

_PG_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.InterfaceError,
)
# Columns of SHARD_SQL's rows that are money (numeric: Decimals from asyncpg).
_MONEY_COLUMNS = frozenset({2, 3, 5, 6, 11, 12})


def _failed(exc: BaseException) -> AuditError:
    """PostgreSQL down is not the same as a query PostgreSQL refused: name which it is,
    with the SQLSTATE, so that an operator does not go looking for an outage."""
    if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _PG_DOWN):
        return AuditError(
            "PostgreSQL",
            f"the audit's query failed (PostgreSQL is up): {exc} [SQLSTATE {exc.sqlstate}]",
        )
    return AuditError("PostgreSQL", str(exc))


def _ledger_row(record: Any) -> LedgerRow:
    values: list[Any] = [
        int(v) if i in _MONEY_COLUMNS and v is not None else v for i, v in enumerate(record)
    ]
    return LedgerRow(*values)


class Postgres:
    """The deployment's schema: the ledger streamed per shard, and the totals."""

    def __init__(self, dsn: str, schema: str, shown_dsn: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.shown_dsn = shown_dsn
        self.pool: Any = None

    async def open(self, partitions: int) -> None:
        try:
            self.pool = await pg.create_pool(
                self.dsn,
                self.schema,
                min_size=1,
                max_size=shards_in_flight + 2,
                timeout_s=connect_timeout_s,
            )
            async with self.pool.acquire() as conn:
                shards = await conn.fetchval(
                    "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent"
                    " JOIN pg_namespace n ON n.oid = p.relnamespace"
                    " WHERE n.nspname = $1 AND p.relname = 'balances'",
                    self.schema,
                )
        except _PG_DOWN as exc:
            raise AuditError("PostgreSQL", f"unreachable at {self.shown_dsn} ({exc})") from None
        except asyncpg.PostgresError as exc:
            raise _failed(exc) from None
        if not shards:
            raise AuditError(
                "PostgreSQL",
                f"no schema {self.schema!r} with Tally's tables (TALLY_TOPIC_PREFIX names it;"
                " `tally migrate` creates it)",
            )
        if shards != partitions:
            raise AuditError(
                "PostgreSQL",
                f"schema {self.schema!r} has {shards} shards but TALLY_PARTITIONS is {partitions}",
            )

    async def close(self) -> None:
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), connect_timeout_s)

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        try:
            async with self.pool.acquire() as conn:
                return list(await conn.fetch(query, *args))
        except (*_PG_DOWN, asyncpg.PostgresError) as exc:
            raise _failed(exc) from None

    async def count(self) -> int:
        return int((await self._fetch("SELECT count(*) FROM balances"))[0][0])

    async def flows(self) -> Counter[tuple[str, Flow]]:
        """The ledger's entries summed per (asset, flow), by `topics.money`'s rule."""
        flows: Counter[tuple[str, Flow]] = Counter()
        for asset, kind, pays_out, total in await self._fetch(FLOWS_SQL):
            flows[(asset, flow_of(kind, pays_out=pays_out))] += int(total)
        return flows

    async def unknown(self, shard: int, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
        rows = await self._fetch(
            UNKNOWN_SQL, shard, [a for a, _ in keys], [asset for _, asset in keys]
        )
        return [(r[0], r[1]) for r in rows]

    async def pages(
        self, shard: int, size: int
    ) -> AsyncGenerator[list[tuple[str, LedgerRow]], None]:
        """The shard's balances and their ledger, `size` rows a page, in key order, from
        one snapshot (a read-only repeatable-read transaction)."""
        try:
            async with (
                self.pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                await conn.execute(f"SET LOCAL work_mem = '{pg_work_mem}'")
                cursor = await conn.cursor(SHARD_SQL, shard)
                while records := await cursor.fetch(size):
                    yield [(sort_key(r[0], r[1]), _ledger_row(r)) for r in records]
        except (*_PG_DOWN, asyncpg.PostgresError) as exc:
            raise _failed(exc) from None
