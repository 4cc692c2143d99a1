"""The PostgreSQL store: each batch of result events in one transaction.

Per batch: `ledger_entries` and `command_results` by COPY; if a row is already there
(a replay, a batch repeated after a crash) the transaction is redone with `unnest`
inserts that skip existing rows, so a replayed batch adds nothing. Then `balances` by
one upsert that only moves forward (`WHERE excluded.seq > balances.seq`), the batch's
breakpoints computed from the entries in SQL, and the consumed offsets into
`sink_offsets`. The offsets commit with the rows: after a crash the sink resumes
exactly after the last batch that reached PostgreSQL, whatever Kafka's own committed
offsets say (they are committed too, afterwards, for lag monitoring).

A command's `reference` and `metadata` (migrations/0004) go on each of its entries and on
its result row; metadata as jsonb.

Money columns are `numeric` (migrations/0002), of any size. The sink's connection sends
them with `sinks.numeric`'s codec, straight from Python ints, by COPY and as `numeric[]`
parameters (asyncpg's own goes through Decimal and cost the sink most of its COPY
speed). Sums of money in SQL stay numeric.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from sinks import pg
from sinks.runner import Batch
from topics.schema import Reason, Status

# A breakpoint at every seq that is a multiple of this, per (account, asset).
breakpoint_every = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_ENTRIES = """
INSERT INTO ledger_entries (shard_id, account, asset, seq, command_id, kind,
    delta_available, delta_held, available, held, at, reference, metadata)
SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
    $7::numeric[], $8::numeric[], $9::numeric[], $10::numeric[], $11::timestamptz[],
    $12::text[], $13::jsonb[])
ON CONFLICT DO NOTHING
"""

_RESULTS = """
INSERT INTO command_results (shard_id, command_id, account, kind, status, reason, at,
    reference, metadata)
SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::timestamptz[], $8::text[], $9::jsonb[])
ON CONFLICT (shard_id, account, command_id) DO UPDATE SET
    account = excluded.account, kind = excluded.kind, status = excluded.status,
    reason = excluded.reason, at = excluded.at, reference = excluded.reference,
    metadata = excluded.metadata
WHERE command_results.reason IN ('invalid_command', 'record_too_large')
"""
# Rejections the engine does not remember: a later decision on the same id replaces them.
_FORGOTTEN = (Reason.INVALID_COMMAND.value, Reason.RECORD_TOO_LARGE.value)

_BALANCES = """
INSERT INTO balances (shard_id, account, asset, available, held, seq, updated_at)
SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::numeric[], $5::numeric[],
    $6::bigint[], $7::timestamptz[])
ON CONFLICT (shard_id, account, asset) DO UPDATE SET
    available = excluded.available, held = excluded.held, seq = excluded.seq,
    updated_at = excluded.updated_at
WHERE excluded.seq > balances.seq
"""

_BREAKPOINTS = """
INSERT INTO breakpoints (shard_id, account, asset, from_seq, to_seq, delta_available,
    delta_held, available_before, held_before, available_after, held_after, created_at)
SELECT e.shard_id, e.account, e.asset, e.seq - $5 + 1, e.seq,
    sum(d.delta_available), sum(d.delta_held),
    e.available - sum(d.delta_available), e.held - sum(d.delta_held),
    e.available, e.held, e.at
FROM unnest($1::int[], $2::text[], $3::text[], $4::bigint[]) AS c(shard_id, account, asset, seq)
JOIN ledger_entries e ON e.shard_id = c.shard_id AND e.account = c.account
    AND e.asset = c.asset AND e.seq = c.seq
JOIN ledger_entries d ON d.shard_id = c.shard_id AND d.account = c.account
    AND d.asset = c.asset AND d.seq BETWEEN c.seq - $5 + 1 AND c.seq
GROUP BY e.shard_id, e.account, e.asset, e.seq, e.available, e.held, e.at
ON CONFLICT DO NOTHING
"""

_ENTRY_COLUMNS = [
    "shard_id", "account", "asset", "seq", "command_id", "kind",
    "delta_available", "delta_held", "available", "held", "at", "reference", "metadata",
]  # fmt: skip
_RESULT_COLUMNS = [
    "shard_id", "command_id", "account", "kind", "status", "reason", "at",
    "reference", "metadata",
]  # fmt: skip
# A result's metadata as the jsonb text PostgreSQL takes (by COPY and in jsonb[]).
_json = msgspec.json.Encoder()

_OFFSETS = """
INSERT INTO sink_offsets (topic, partition, next_offset)
SELECT $1, * FROM unnest($2::int[], $3::bigint[])
ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset
"""


def at(ms: int) -> datetime:
    """An event's time as a timestamptz, exactly (no float on the way)."""
    return _EPOCH + timedelta(milliseconds=ms)


class PostgresStore:
    name = "postgres"
    unavailable: tuple[type[BaseException], ...] = (
        OSError,
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        asyncpg.CannotConnectNowError,
        asyncpg.AdminShutdownError,
        # A connection left mid-protocol: when the server shuts down during a COPY,
        # asyncpg raises the shutdown to the COPY while still waiting for the server's
        # ReadyForQuery, and the transaction's ROLLBACK then fails with "cannot switch to
        # state ...; another operation is in progress". Only a new connection helps; the
        # batch is written again, idempotently. (Seen once in a clean-clone fault run.)
        asyncpg.InternalClientError,
        TimeoutError,
    )

    def __init__(self, dsn: str, schema: str, *, breakpoint_every: int = breakpoint_every) -> None:
        self.dsn = dsn
        self.schema = schema
        self.breakpoint_every = breakpoint_every
        self.conn: asyncpg.Connection | None = None

    async def open(self) -> None:
        await self.close()
        self.conn = await pg.connect(self.dsn, self.schema, exact_money=True)

    async def ping(self, timeout_s: float) -> None:
        """Whether PostgreSQL answers now, on a connection of its own (the sink's is busy
        with a batch while the readiness probe asks)."""
        conn = await pg.connect(self.dsn, None, timeout_s=timeout_s)
        try:
            await conn.fetchval("SELECT 1", timeout=timeout_s)
        finally:
            conn.terminate()

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.terminate()

    async def offsets(self, topic: str) -> dict[int, int]:
        conn = await self._conn()
        rows = await conn.fetch(
            "SELECT partition, next_offset FROM sink_offsets WHERE topic = $1", topic
        )
        return {row["partition"]: row["next_offset"] for row in rows}

    async def _conn(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            await self.open()
        assert self.conn is not None
        return self.conn

    async def write(self, batch: Batch) -> None:
        await self._write(await self._conn(), batch)

    async def _write(self, conn: asyncpg.Connection, batch: Batch) -> None:
        entry_rows: list[tuple[Any, ...]] = []
        results: dict[tuple[int, str, str], tuple[Any, ...]] = {}
        balances: dict[tuple[int, str, str], tuple[Any, ...]] = {}
        breakpoints: list[list[Any]] = [[], [], [], []]
        times: dict[int, datetime] = {}  # events of a batch share few distinct times
        for shard, result in batch.events:
            when = times.get(result.at_ms)
            if when is None:
                when = times[result.at_ms] = at(result.at_ms)
            reference = result.reference
            metadata = None if result.metadata is None else _json.encode(result.metadata).decode()
            for e in result.entries:
                row = (
                    shard, e.account, e.asset, e.seq, result.command_id, result.kind,
                    e.delta_available, e.delta_held, e.available, e.held, when,
                    reference, metadata,
                )  # fmt: skip
                entry_rows.append(row)
                key = (shard, e.account, e.asset)
                if key not in balances or balances[key][5] < e.seq:
                    balances[key] = (shard, e.account, e.asset, e.available, e.held, e.seq, when)
                if e.seq % self.breakpoint_every == 0:
                    for column, value in zip(
                        breakpoints, (shard, e.account, e.asset, e.seq), strict=True
                    ):
                        column.append(value)
            if result.status is Status.DUPLICATE or result.reason is Reason.COMMAND_ID_REUSED:
                continue  # not a decision: the first result already is one
            rkey = (shard, result.account, result.command_id)
            known = results.get(rkey)
            if known is None or known[5] in _FORGOTTEN:
                results[rkey] = (
                    shard,
                    result.command_id,
                    result.account,
                    result.kind,
                    result.status.value,
                    None if result.reason is None else result.reason.value,
                    when,
                    reference,
                    metadata,
                )
        parts = sorted(batch.offsets.items())
        try:
            # The usual case, a batch never written before: COPY, the fastest way in.
            async with conn.transaction():
                if entry_rows:
                    await conn.copy_records_to_table(
                        "ledger_entries", records=entry_rows, columns=_ENTRY_COLUMNS
                    )
                if results:
                    await conn.copy_records_to_table(
                        "command_results", records=list(results.values()), columns=_RESULT_COLUMNS
                    )
                await self._rest(conn, batch.topic, balances, breakpoints, parts)
        except asyncpg.UniqueViolationError:
            # Rows already there: a replay, a batch repeated after a crash, or a command
            # id seen before. Same rows again, skipping what exists.
            async with conn.transaction():
                if entry_rows:
                    await conn.execute(_ENTRIES, *_columns(entry_rows, 13))
                if results:
                    await conn.execute(_RESULTS, *_columns(results.values(), 9))
                await self._rest(conn, batch.topic, balances, breakpoints, parts)

    async def _rest(
        self,
        conn: asyncpg.Connection,
        topic: str,
        balances: dict[tuple[int, str, str], tuple[Any, ...]],
        breakpoints: list[list[Any]],
        parts: list[tuple[int, int]],
    ) -> None:
        if balances:
            await conn.execute(_BALANCES, *_columns(balances.values(), 7))
        if breakpoints[0]:
            await conn.execute(_BREAKPOINTS, *breakpoints, self.breakpoint_every)
        await conn.execute(_OFFSETS, topic, [p for p, _ in parts], [o for _, o in parts])


def _columns(rows: Any, width: int) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns
