"""The checks of a request's parts that the handlers share (query parameters, content
type, the account in the path), and a PostgreSQL query's answer in time or a 503."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from typing import TypeVar

import asyncpg
from aiohttp import web

from ingress.problems import Problem
from topics import limits

QUERY_TIMEOUT_S = 4.0
_ACCOUNT = re.compile(limits.ACCOUNT_ID_PATTERN)
_T = TypeVar("_T")


def no_query(request: web.Request, allowed: tuple[str, ...] = ()) -> None:
    """Only `allowed` query parameters (400 naming the first other one)."""
    for name in request.query:
        if name not in allowed:
            raise Problem(400, "unknown query parameter", f"{name!r} is not taken here",
                          field=name)  # fmt: skip


def query_once(request: web.Request, allowed: tuple[str, ...]) -> None:
    """Only `allowed` query parameters, each given once (a repeated one has no one
    meaning: refused, naming it)."""
    no_query(request, allowed)
    for name in request.query:
        if len(request.query.getall(name)) > 1:
            raise Problem(400, "repeated query parameter", f"give {name} once", field=name)


def json_body(request: web.Request) -> None:
    """Refuse (415) a body that is not said to be application/json."""
    if request.content_type != "application/json":
        raise Problem(
            415,
            "unsupported content type",
            f"got {request.content_type or 'none'}; send application/json",
            field="Content-Type",
        )


def check_account(account: str) -> None:
    if not _ACCOUNT.match(account):
        raise Problem(
            400, "invalid account id", "1-64 characters of A-Z a-z 0-9 _ . : -", field="account"
        )


async def postgres(query: Awaitable[_T]) -> _T:
    """A query's answer, or a 503 when PostgreSQL cannot give it in time."""
    try:
        return await asyncio.wait_for(query, QUERY_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
            asyncpg.InternalClientError) as exc:  # fmt: skip
        raise Problem(
            503, "PostgreSQL unavailable", type(exc).__name__, field="postgres",
            headers={"Retry-After": "2"},
        ) from None  # fmt: skip
