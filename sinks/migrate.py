"""`tally migrate`: apply the numbered SQL files of `migrations/` to a deployment's schema.

Each deployment (topic prefix) has its own PostgreSQL schema, named after the prefix.
Pending files run in order, each in its own transaction together with its row in
`schema_migrations`; a session-level advisory lock per schema makes concurrent runs
take turns, and a second run finds nothing to do. After the files, one partition per
shard is created for every shard-partitioned table. A file that changes a column's
type (0002: bigint money columns to numeric) rewrites the table and its partitions under
an exclusive lock; the README says how to run it on a live deployment.

Why not a library: the candidates (alembic, yoyo) bring SQLAlchemy or a sync driver
and their own file formats; this is plain SQL over asyncpg in forty lines.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import asyncpg

from core.settings import Settings
from sinks import pg
from sinks.errors import SinkError
from sinks.pg import quote

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"
SHARDED_TABLES = ("balances", "ledger_entries", "command_results", "breakpoints")
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(SinkError):
    """The migrations folder or the schema is not in a state we can work from."""


def files(folder: Path = MIGRATIONS) -> list[tuple[int, str, Path]]:
    """(version, name, path) of every migration file, in order; refuses gaps or clashes."""
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        found.append((int(match.group(1)), match.group(2), path))
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration numbers must be 1, 2, 3... without gaps: {versions}")
    return found


def _lock_key(schema: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(schema.encode(), digest_size=8).digest(), "big", signed=True
    )


async def migrate(
    dsn: str, schema: str, partitions: int, say: Callable[[str], None] = lambda _: None
) -> list[str]:
    """Bring `schema` up to date; return the names of the files applied now."""
    pending = files()
    conn = await pg.connect(dsn, None)
    ident = quote(schema)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _lock_key(schema))
        try:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {ident}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {ident}.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                row["version"]
                for row in await conn.fetch(f"SELECT version FROM {ident}.schema_migrations")
            }
            for version, name, path in pending:
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL search_path TO {ident}")
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                applied.append(path.name)
                say(f"applied {path.name} to schema {schema}")
            await _ensure_partitions(conn, schema, partitions)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _lock_key(schema))
    finally:
        await conn.close()
    return applied


async def _ensure_partitions(conn: asyncpg.Connection, schema: str, partitions: int) -> None:
    ident = quote(schema)
    existing = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace"
        " WHERE n.nspname = $1 AND p.relname = 'balances'",
        schema,
    )
    shards = sorted(int(row["relname"].rsplit("_p", 1)[1]) for row in existing)
    if shards and shards[-1] >= partitions:
        raise MigrationError(
            f"schema {schema} has partitions for {shards[-1] + 1} shards, TALLY_PARTITIONS is "
            f"{partitions}: the shard count of a deployment never changes (replay into a new one)"
        )
    async with conn.transaction():
        for table in SHARDED_TABLES:
            # balances rows are updated in place all the time: room on each page lets
            # PostgreSQL do it without touching the index (HOT updates).
            storage = " WITH (fillfactor = 70)" if table == "balances" else ""
            for shard in range(partitions):
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {ident}.{quote(f'{table}_p{shard}')}"
                    f" PARTITION OF {ident}.{table} FOR VALUES IN ({shard}){storage}"
                )


async def migrate_deployment(
    settings: Settings, say: Callable[[str], None] = lambda _: None
) -> list[str]:
    """`tally migrate`: bring the deployment's schema up to date; a PostgreSQL that
    cannot be reached is a MigrationError too (one line for the operator)."""
    try:
        return await migrate(settings.pg_dsn, settings.topic_prefix, settings.partitions, say=say)
    except OSError as exc:
        raise MigrationError(f"PostgreSQL unreachable ({exc})") from exc
