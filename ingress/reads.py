"""The ledger's read queries on PostgreSQL (issue 16): history, balances at a point in
the past, commands by reference; and the parsing of their query parameters.

Every query names its shard, so that it runs on one partition of each table, and walks
an index: a history page is a range of the `ledger_entries` key (shard_id, account,
asset, seq); a balance at a seq is the last breakpoint at or before it (the
`breakpoints` key) plus the entries after it, at most a breakpoint interval of them; a
balance at a time finds that breakpoint by `breakpoints_by_time` (migrations/0004),
bounds the entries by the next breakpoint, and sums them. Money stays numeric in SQL and
comes back as Python ints (the pool uses `sinks.numeric`'s codec), exact at any size.

What these answer is the PostgreSQL projection: it lags the engine by the sink's delay,
and an answer says the `seq` it reflects.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import asyncpg
import msgspec

from ingress.problems import Problem
from sinks.postgres import at as timestamp
from topics import limits
from topics.ids import path_segment

# A history page holds at most this many entries: 1,000 entries of 128-bit balances and
# 1 KiB of metadata each stay about a megabyte, the most one answer should be.
PAGE_LIMIT_MAX = 1000
PAGE_LIMIT_DEFAULT = 100
# At most this many commands answer `GET /v1/commands?reference=`: a reference is the
# client's own and may be shared by many commands; the rest are cut, and said so.
REFERENCE_COMMANDS_MAX = 100

_DIGITS = re.compile(r"^[0-9]{1,19}$")
_ASSET = re.compile(limits.ASSET_PATTERN)
_REFERENCE = re.compile(limits.REFERENCE_PATTERN)
_metadata = msgspec.json.Decoder(dict[str, str])


def parse_seq(value: str | None, field: str, *, least: int = 0) -> int | None:
    """A seq given in a query (`after_seq`, `before_seq`, `seq`): ASCII digits, from
    `least` to limits.SEQ_MAX; None when absent."""
    if value is None:
        return None
    if not _DIGITS.match(value) or not least <= int(value) <= limits.SEQ_MAX:
        raise Problem(
            400, f"invalid {field}", f"an integer from {least} to {limits.SEQ_MAX}", field=field
        )
    return int(value)


def parse_limit(value: str | None) -> int:
    if value is None:
        return PAGE_LIMIT_DEFAULT
    if not _DIGITS.match(value) or not 1 <= int(value) <= PAGE_LIMIT_MAX:
        raise Problem(400, "invalid limit", f"an integer from 1 to {PAGE_LIMIT_MAX}", field="limit")
    return int(value)


def parse_asset(value: str | None, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise Problem(400, "missing asset", "name one asset: ?asset=USD", field="asset")
        return None
    if not _ASSET.match(value):
        raise Problem(400, "invalid asset", "1-12 characters of A-Z 0-9", field="asset")
    return value


def parse_reference(value: str | None) -> str:
    if value is None or not _REFERENCE.match(value):
        raise Problem(
            400, "invalid reference", "1-128 characters of A-Z a-z 0-9 _ . : -", field="reference"
        )
    return value


def parse_time(value: str) -> int:
    """A point in time as epoch milliseconds: ASCII digits (epoch ms), or an RFC 3339
    time with its offset (`2026-12-01T23:00:00.123Z`), cut to the millisecond. Within
    the times events carry (limits.TIME_MS_MIN..TIME_MS_MAX)."""
    bad = Problem(
        400,
        "invalid at",
        "epoch milliseconds, or an RFC 3339 time with an offset "
        "(2026-12-01T23:00:00Z), from 1970 to 9999",
        field="at",
    )
    if value.isascii() and value.isdigit():
        if not _DIGITS.match(value) or int(value) > limits.TIME_MS_MAX:
            raise bad
        return int(value)
    # RFC 3339 only: a 'T' or ' ' between date and time, seconds given, an offset given.
    if not re.fullmatch(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
        r"([Zz]|[+-][0-9]{2}:[0-9]{2})",
        value,
    ):
        raise bad
    text = value.replace("z", "Z").replace("t", "T")
    fraction = re.search(r"\.([0-9]+)", text)
    if fraction:  # Python takes at most 6 fraction digits; milliseconds need 3.
        text = text.replace(fraction.group(0), "." + fraction.group(1)[:6].ljust(6, "0"))
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise bad from None
    # The difference of two aware times needs no conversion (astimezone would overflow
    # at the ends of year 1 and 9999).
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    ms = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    if not limits.TIME_MS_MIN <= ms <= limits.TIME_MS_MAX:
        raise bad
    return ms


# --- history -------------------------------------------------------------------------

_HISTORY_SQL = """
SELECT seq, command_id, kind, delta_available, delta_held, available, held,
       (extract(epoch FROM at) * 1000)::bigint AS at_ms, reference, metadata::text AS metadata
FROM ledger_entries
WHERE shard_id = $1 AND account = $2 AND asset = $3 AND seq > $4 AND seq < $5
ORDER BY seq
LIMIT $6
"""


def _entry(row: asyncpg.Record) -> dict[str, Any]:
    entry = dict(row.items())
    if entry["metadata"] is not None:
        entry["metadata"] = _metadata.decode(entry["metadata"])
    return entry


async def history(
    pg: asyncpg.Pool,
    *,
    shard: int,
    account: str,
    asset: str,
    after_seq: int,
    before_seq: int | None,
    limit: int,
) -> dict[str, Any]:
    """One page of a balance's entries, oldest first (seq ascending): the seq a client
    has read is its cursor, and entries that arrive while it reads get higher seqs, so
    paging by `next` walks every entry exactly once. `next` is given when the page is
    full; a client following a busy account keeps polling the last page's `next`."""
    upper = limits.SEQ_MAX if before_seq is None else before_seq
    rows = await pg.fetch(_HISTORY_SQL, shard, account, asset, after_seq, upper, limit)
    entries = [_entry(row) for row in rows]
    next_link = None
    if len(entries) == limit:
        query = {"asset": asset, "after_seq": entries[-1]["seq"], "limit": limit}
        if before_seq is not None:
            query["before_seq"] = before_seq
        # The account as one escaped path segment: ".." must not become a path step.
        next_link = f"/v1/accounts/{path_segment(account)}/entries?{urlencode(query)}"
    return {
        "account": account,
        "asset": asset,
        "shard_id": shard,
        "order": "oldest_first",
        "entries": entries,
        "next": next_link,
    }


# --- balances at a point --------------------------------------------------------------

# The balance after entry $4: the last breakpoint at or before it plus the entries after
# the breakpoint up to $4 (at most one breakpoint interval, by the key). `seq` is the
# last entry at or before $4, 0 before the first.
_AT_SEQ_SQL = """
WITH b AS (
    SELECT to_seq, available_after, held_after FROM breakpoints
    WHERE shard_id = $1 AND account = $2 AND asset = $3 AND to_seq <= $4
    ORDER BY to_seq DESC LIMIT 1
), e AS (
    SELECT sum(delta_available) AS da, sum(delta_held) AS dh, max(seq) AS seq
    FROM ledger_entries
    WHERE shard_id = $1 AND account = $2 AND asset = $3
      AND seq > coalesce((SELECT to_seq FROM b), 0) AND seq <= $4
)
SELECT coalesce((SELECT available_after FROM b), 0) + coalesce(e.da, 0) AS available,
       coalesce((SELECT held_after FROM b), 0) + coalesce(e.dh, 0) AS held,
       coalesce(e.seq, (SELECT to_seq FROM b), 0) AS seq
FROM e
"""

# The balance at time $4: the last breakpoint written at or before it, then its entries
# up to the next breakpoint (which is after $4, or it would be the last) that are at or
# before $4. A shard's engine time never goes back, so along one balance `at` grows
# with seq and the entries at or before $4 are a prefix.
_AT_TIME_SQL = """
WITH b AS (
    SELECT to_seq, available_after, held_after FROM breakpoints
    WHERE shard_id = $1 AND account = $2 AND asset = $3 AND created_at <= $4
    ORDER BY created_at DESC, to_seq DESC LIMIT 1
), n AS (
    SELECT coalesce(min(to_seq), $5) AS to_seq FROM breakpoints
    WHERE shard_id = $1 AND account = $2 AND asset = $3
      AND to_seq > coalesce((SELECT to_seq FROM b), 0)
), e AS (
    SELECT sum(delta_available) AS da, sum(delta_held) AS dh, max(seq) AS seq
    FROM ledger_entries
    WHERE shard_id = $1 AND account = $2 AND asset = $3
      AND seq > coalesce((SELECT to_seq FROM b), 0) AND seq <= (SELECT to_seq FROM n)
      AND at <= $4
)
SELECT coalesce((SELECT available_after FROM b), 0) + coalesce(e.da, 0) AS available,
       coalesce((SELECT held_after FROM b), 0) + coalesce(e.dh, 0) AS held,
       coalesce(e.seq, (SELECT to_seq FROM b), 0) AS seq
FROM e
"""

_LAST_SEQ_SQL = """
SELECT max(seq) FROM ledger_entries WHERE shard_id = $1 AND account = $2 AND asset = $3
"""
_ASSETS_SQL = """
SELECT asset FROM balances WHERE shard_id = $1 AND account = $2 ORDER BY asset
"""


def _balance(row: asyncpg.Record) -> dict[str, int]:
    return {"available": row["available"], "held": row["held"], "seq": row["seq"]}


async def balance_at_seq(
    pg: asyncpg.Pool, *, shard: int, account: str, asset: str, seq: int
) -> dict[str, int]:
    """The (account, asset) balance right after its entry `seq` (0: before the first).
    A seq past the last one recorded is refused, naming `seq`."""
    async with pg.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        last = await conn.fetchval(_LAST_SEQ_SQL, shard, account, asset) or 0
        if seq > last:
            raise Problem(
                404,
                "seq beyond the last entry",
                f"the last entry of {asset} recorded for this account is seq {last}",
                field="seq",
            )
        row = await conn.fetchrow(_AT_SEQ_SQL, shard, account, asset, seq)
    assert row is not None
    return _balance(row)


async def balances_at_time(
    pg: asyncpg.Pool, *, shard: int, account: str, asset: str | None, at_ms: int
) -> dict[str, dict[str, int]]:
    """Every balance of the account (or the one `asset`) as it was at `at_ms`: the
    balances with no entry by then are left out (a named asset shows zeros, seq 0)."""
    when = timestamp(at_ms)
    out: dict[str, dict[str, int]] = {}
    async with pg.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        if asset is None:
            assets = [r["asset"] for r in await conn.fetch(_ASSETS_SQL, shard, account)]
        else:
            assets = [asset]
        for name in assets:
            row = await conn.fetchrow(_AT_TIME_SQL, shard, account, name, when, limits.SEQ_MAX)
            assert row is not None
            if row["seq"] or asset is not None:
                out[name] = _balance(row)
    return out


# --- commands by reference -------------------------------------------------------------

_BY_REFERENCE_SQL = """
SELECT shard_id, command_id, account, kind, status, reason,
       (extract(epoch FROM at) * 1000)::bigint AS at_ms, reference, metadata::text AS metadata
FROM command_results
WHERE reference = $1
ORDER BY account, command_id
LIMIT $2
"""


def command_row(row: asyncpg.Record) -> dict[str, Any]:
    """A `command_results` row as JSON (metadata decoded)."""
    return _entry(row)


async def commands_by_reference(pg: asyncpg.Pool, reference: str) -> dict[str, Any]:
    """The first decisions of the commands that carry `reference`, up to
    REFERENCE_COMMANDS_MAX of them (`truncated` says whether there were more)."""
    rows = await pg.fetch(_BY_REFERENCE_SQL, reference, REFERENCE_COMMANDS_MAX + 1)
    commands = [_entry(row) for row in rows[:REFERENCE_COMMANDS_MAX]]
    return {
        "reference": reference,
        "commands": commands,
        "truncated": len(rows) > REFERENCE_COMMANDS_MAX,
    }
