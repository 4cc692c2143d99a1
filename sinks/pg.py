"""The one way Tally connects to a deployment's PostgreSQL schema: every connection and
pool sets its `search_path` to the deployment's schema (quoted: a prefix may hold any
character a schema name can), and asks for money columns as exact ints when it reads
them."""

from __future__ import annotations

from typing import Any

import asyncpg

from sinks import numeric

CONNECT_TIMEOUT_S = 5.0


def quote(identifier: str) -> str:
    """`identifier` as a PostgreSQL quoted identifier."""
    return '"' + identifier.replace('"', '""') + '"'


def _server_settings(
    schema: str | None, extra: dict[str, str] | None = None
) -> dict[str, str] | None:
    settings = {**(extra or {}), **({} if schema is None else {"search_path": quote(schema)})}
    return settings or None


async def connect(
    dsn: str,
    schema: str | None,
    *,
    timeout_s: float = CONNECT_TIMEOUT_S,
    exact_money: bool = False,
) -> Any:
    """A connection whose unqualified names are the tables of `schema` (None: the
    server's default path). `exact_money` decodes numeric columns as ints."""
    conn = await asyncpg.connect(dsn, server_settings=_server_settings(schema), timeout=timeout_s)
    if exact_money:
        await numeric.use_int_codec(conn)
    return conn


async def create_pool(
    dsn: str,
    schema: str,
    *,
    min_size: int,
    max_size: int,
    timeout_s: float = CONNECT_TIMEOUT_S,
    exact_money: bool = False,
    server_settings: dict[str, str] | None = None,
    **options: Any,
) -> Any:
    """A pool of such connections. `server_settings` adds session settings (e.g.
    `synchronous_commit`); `options` go to asyncpg's create_pool as they are."""
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout_s,
        server_settings=_server_settings(schema, server_settings),
        init=numeric.use_int_codec if exact_money else None,
        **options,
    )
