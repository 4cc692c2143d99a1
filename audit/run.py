"""`tally audit`: recompute every balance from the ledger and compare every store with it,
one shard at a time, in bounded memory.

The reference is the ledger in PostgreSQL. A balance is its last breakpoint's `*_after`
plus the deltas of its entries after the breakpoint's `to_seq` (the sum of all its
entries when it has no breakpoint yet), and its seq is its last entry's. PostgreSQL
`balances`, the Redis hashes and the engine's tables are each compared with that,
balance by balance. Besides, the seqs of each balance's entries must be exactly 1..n,
its breakpoint must agree with the sum of all its entries, and per asset the
recomputed balances must add up to the money that came in and went out (conservation).

Memory. Nothing is loaded whole. Per shard, PostgreSQL streams one row per balance
(its `balances` row and its recomputation, joined and aggregated by the server) through
a server-side cursor, sorted by the bytes of `account|asset`, which is the order of the
engine's RocksDB keys (`b|account|asset`); the engine pages through the same shard in
the same order. The two sorted streams are merged a page at a time, and the Redis hashes
of each merged page are read with one script call (a shard's keys share one hash slot),
with whether each asset is listed in its account's asset set.
At most `shards_in_flight` shards are open at once, each holding about one page of each
source. Redis keys that no other source knows of are found by counting each shard's
keys with SCAN, and only when a count disagrees by checking the scanned keys page by
page.

Consistency. Each store is read as it is when its page is read: audit a deployment
whose sinks have drained. Under load, what is still in flight shows up as differences.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import aiohttp
import asyncpg
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core.errors import CANNOT_RUN, TallyError
from core.progress import Progress
from core.settings import Settings
from sinks import pg
from sinks.redis_store import assets_key, balance_key
from streams.client import ShardPage, shard_page_limit_max
from topics.shard import shard_of

# Rows per PostgreSQL fetch, per engine page and per Redis script call. A page of each
# source per open shard is what the audit holds in memory.
batch_size_default = 5000
batch_size_max = shard_page_limit_max
# Shards audited at once: while one waits for PostgreSQL to sort a shard, another merges.
shards_in_flight = 2
# How long a shard that no engine worker serves (a rebalance, a recovery) is waited for.
engine_wait_s = 30.0
engine_page_timeout_s = 30.0
connect_timeout_s = 5.0
# The server sorts and aggregates a whole shard before the first row: room for that.
pg_work_mem = "64MB"
redis_scan_count = 10_000
show_default = 20

KINDS = ("postgres", "redis", "engine", "seq_gap", "breakpoint", "conservation")
STORES = {"postgres": "PostgreSQL balances", "redis": "Redis", "engine": "engine tables"}

# (available, held, seq); a store's field that is missing or unreadable is None.
Triple = tuple[int, int, int]
Found = tuple[int | None, int | None, int | None]


class AuditError(TallyError):
    """The audit could not run: a store is unreachable or not what the settings say.
    `store` names it (PostgreSQL, Redis, engine) for the one-line message."""

    exit_code = CANNOT_RUN

    def __init__(self, store: str, message: str) -> None:
        super().__init__(f"{store}: {message}")
        self.store = store


# The rows -----------------------------------------------------------------------------


class LedgerRow(NamedTuple):
    """One balance as PostgreSQL knows it: its `balances` row (None columns when it has
    none) and the ledger's account of it (None columns when it has no entries)."""

    account: str
    asset: str
    available: int | None
    held: int | None
    seq: int | None
    ledger_available: int | None
    ledger_held: int | None
    last_seq: int | None
    entries: int | None
    first_seq: int | None
    breakpoint_seq: int | None
    sum_available: int | None
    sum_held: int | None

    @property
    def balance(self) -> Found | None:
        return None if self.seq is None else (self.available, self.held, self.seq)

    @property
    def ledger(self) -> Triple | None:
        if self.last_seq is None or self.ledger_available is None or self.ledger_held is None:
            return None
        return (self.ledger_available, self.ledger_held, self.last_seq)


@dataclass(frozen=True)
class Mismatch:
    """One disagreement, named by its balance and the ledger's seq for it."""

    kind: str
    shard: int
    account: str
    asset: str
    seq: int | None
    expected: str
    found: str

    def line(self) -> str:
        seq = "-" if self.seq is None else str(self.seq)
        where = f"{self.account}/{self.asset} seq {seq} (shard {self.shard})"
        return f"{self.kind:<10} {where}: expected {self.expected}; found {self.found}"


def sort_key(account: str, asset: str) -> str:
    """A balance's place in the engine's RocksDB order (`b|account|asset` as bytes). Ids
    are ASCII, so comparing these strings compares those bytes; PostgreSQL sorts the
    same text with COLLATE "C". Not (account, asset): '|' sorts after every id
    character, so "ab|X" comes after "abc|X"."""
    return f"{account}|{asset}"


def describe(value: Found | None) -> str:
    if value is None:
        return "no balance"
    available, held, seq = ("?" if v is None else v for v in value)
    return f"available {available}, held {held}, seq {seq}"


# Merging two sorted streams -------------------------------------------------------------

L = TypeVar("L")
R = TypeVar("R")


def merge_step(
    left: Sequence[tuple[str, L]],
    right: Sequence[tuple[str, R]],
    left_done: bool,
    right_done: bool,
) -> tuple[list[tuple[str, L | None, R | None]], list[tuple[str, L]], list[tuple[str, R]]]:
    """Merge what can be merged now of two buffers of key-sorted (key, value) pairs.

    A key can be merged once neither stream can still deliver it: it is at most the
    last buffered key of every stream that has more pages to come. Returns the merged
    (key, left value or None, right value or None) triples in key order, and what is
    left of each buffer. A stream with more to come and an empty buffer blocks: fetch
    its next page first."""
    bounds = []
    for buffer, done in ((left, left_done), (right, right_done)):
        if not done:
            if not buffer:
                return [], list(left), list(right)
            bounds.append(buffer[-1][0])
    bound = min(bounds) if bounds else None
    out: list[tuple[str, L | None, R | None]] = []
    i = j = 0
    while i < len(left) or j < len(right):
        lk = left[i][0] if i < len(left) else None
        rk = right[j][0] if j < len(right) else None
        key = rk if lk is None else lk if rk is None else min(lk, rk)
        assert key is not None
        if bound is not None and key > bound:
            break
        lv: L | None = None
        rv: R | None = None
        if lk == key:
            lv = left[i][1]
            i += 1
        if rk == key:
            rv = right[j][1]
            j += 1
        out.append((key, lv, rv))
    return out, list(left[i:]), list(right[j:])


async def aligned(
    left: AsyncIterator[list[tuple[str, L]]], right: AsyncIterator[list[tuple[str, R]]]
) -> AsyncGenerator[list[tuple[str, L | None, R | None]], None]:
    """Two async streams of key-sorted pages, merged into pages of (key, left, right):
    every key of either stream once, in order, with what each stream has for it."""
    lbuf: list[tuple[str, L]] = []
    rbuf: list[tuple[str, R]] = []
    ldone = rdone = False
    lkey = rkey = ""
    while True:
        want_left = not lbuf and not ldone
        want_right = not rbuf and not rdone
        if want_left or want_right:
            lpage, rpage = await asyncio.gather(
                anext(left, None) if want_left else _none(),
                anext(right, None) if want_right else _none(),
            )
            if want_left:
                ldone, lbuf, lkey = _take(lpage, lkey, "left")
            if want_right:
                rdone, rbuf, rkey = _take(rpage, rkey, "right")
        out, lbuf, rbuf = merge_step(lbuf, rbuf, ldone, rdone)
        if out:
            yield out
        elif ldone and rdone:
            return


async def _none() -> None:
    return None


class OutOfOrder(ValueError):
    """A stream's keys did not strictly increase: a bug or a collation that is not "C"
    (it would read as keys missing on the other side)."""

    def __init__(self, side: str, key: str, last: str) -> None:
        super().__init__(f"keys out of order: {key!r} after {last!r}")
        self.side = side


def _take(page: list[tuple[str, L]] | None, last: str, side: str) -> tuple[bool, list[Any], str]:
    """(done, buffer, last key) after a page of one side."""
    if page is None:
        return True, [], last
    for key, _ in page:
        if key <= last:
            raise OutOfOrder(side, key, last)
        last = key
    return False, page, last


# Comparing one balance ------------------------------------------------------------------


def compare(
    shard: int,
    key: str,
    row: LedgerRow | None,
    engine: Found | None,
    redis: Found | None,
    *,
    with_engine: bool = True,
    with_redis: bool = True,
    redis_listed: bool = True,
) -> list[Mismatch]:
    """Every disagreement about one balance: the ledger's own consistency, then each
    store against the ledger's recomputation. A mismatch carries the ledger's seq, or
    the store's when the ledger has no entries for the balance."""
    ledger = row.ledger if row is not None else None
    stores: list[tuple[str, Found | None]] = [("postgres", row.balance if row else None)]
    if with_redis:
        stores.append(("redis", redis))
    if with_engine:
        stores.append(("engine", engine))
    if (
        ledger is not None
        and row is not None
        and row.first_seq == 1
        and row.last_seq == row.entries
        and (row.breakpoint_seq is None or (row.sum_available, row.sum_held) == ledger[:2])
        and (redis_listed or not with_redis)
        and all(value == ledger for _, value in stores)
    ):
        return []  # the usual case, decided without building any text
    account, _, asset = key.rpartition("|")
    out: list[Mismatch] = []

    def differ(kind: str, expected: str, found: str, value: Found | None = None) -> None:
        seq = ledger[2] if ledger is not None else value[2] if value is not None else None
        out.append(Mismatch(kind, shard, account, asset, seq, expected, found))

    if row is not None and row.entries is not None:
        if row.first_seq != 1 or row.last_seq != row.entries:
            differ(
                "seq_gap",
                f"seq 1..{row.last_seq} once each",
                f"{row.entries} entries from seq {row.first_seq} to {row.last_seq}",
            )
        if row.breakpoint_seq is not None and ledger is not None:
            summed = (row.sum_available, row.sum_held)
            if summed != ledger[:2]:
                differ(
                    "breakpoint",
                    f"available {summed[0]}, held {summed[1]} (the sum of all entries)",
                    f"available {ledger[0]}, held {ledger[1]} (breakpoint at seq "
                    f"{row.breakpoint_seq} + later entries)",
                )
    for kind, value in stores:
        if value != ledger:
            expected = "no balance (no ledger entries)" if ledger is None else describe(ledger)
            differ(kind, f"(ledger) {expected}", f"({STORES[kind]}) {describe(value)}", value)
    if with_redis and redis is not None and not redis_listed:
        differ("redis", f"{asset} in the account's asset set", "not listed", redis)
    return out


# Conservation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AssetFlow:
    """One asset's money: what the recomputed balances hold against what came in and
    went out. `captured_out` and `withdrawals` are negative; `internal` is the net of
    every movement between accounts (transfers, disbursements, captures to an account,
    with their credits and refunds; holds, releases and expiries), 0 once drained."""

    asset: str
    balances: int
    deposits: int = 0
    withdrawals: int = 0
    captured_out: int = 0
    internal: int = 0

    @property
    def external(self) -> int:
        return self.deposits + self.withdrawals + self.captured_out

    @property
    def ok(self) -> bool:
        return self.balances == self.external and self.internal == 0

    def line(self) -> str:
        mark = "=" if self.balances == self.external else "!="
        return (
            f"{self.asset}: balances {self.balances} {mark} deposits {self.deposits}"
            f" - withdrawals {-self.withdrawals} - captured out {-self.captured_out};"
            f" between accounts net {self.internal}"
        )


def asset_flows(balances: dict[str, int], flows: dict[tuple[str, str], int]) -> list[AssetFlow]:
    """Per asset, the balances' sum next to the ledger's sums by flow (deposit, withdraw,
    capture, internal: see FLOWS_SQL)."""
    assets = sorted(set(balances) | {asset for asset, _ in flows})
    return [
        AssetFlow(
            asset,
            balances.get(asset, 0),
            deposits=flows.get((asset, "deposit"), 0),
            withdrawals=flows.get((asset, "withdraw"), 0),
            captured_out=flows.get((asset, "capture"), 0),
            internal=flows.get((asset, "internal"), 0),
        )
        for asset in assets
    ]


# PostgreSQL ------------------------------------------------------------------------------

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

# The ledger's sums per asset and flow. Money enters by deposits and leaves by
# withdrawals and by captures to no account. A capture to an account is a move between
# accounts: its credit (or the refund of that credit) carries the capture's id
# ("<payer>/<capture id>/credit[/refund]", topics.ids) and counts with the capture,
# so that the capture flow nets to what left the system.
FLOWS_SQL = """
WITH captures AS (
    SELECT DISTINCT account, command_id FROM ledger_entries WHERE kind = 'capture'
)
SELECT e.asset,
    CASE WHEN e.kind IN ('deposit', 'withdraw') THEN e.kind
         WHEN e.kind = 'capture' OR c.account IS NOT NULL THEN 'capture'
         ELSE 'internal' END AS flow,
    sum(e.delta_available + e.delta_held) AS total
FROM ledger_entries e
LEFT JOIN captures c ON e.kind IN ('credit', 'refund')
    AND c.account = split_part(e.command_id, '/', 1)
    AND c.command_id = split_part(e.command_id, '/', 2)
GROUP BY 1, 2
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

    async def flows(self) -> dict[tuple[str, str], int]:
        return {(r[0], r[1]): int(r[2]) for r in await self._fetch(FLOWS_SQL)}

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


# Redis -------------------------------------------------------------------------------------

# KEYS: a page's balance keys, then their accounts' asset-set keys (one hash slot: the
# shard's). Returns available, held, seq and 1/0 "the asset is in the account's set",
# four values a key: one round trip and one reply a page instead of one per key.
READ_SCRIPT = """
local n = #KEYS / 2
local out = {}
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i], 'available', 'held', 'seq')
  out[#out + 1] = v[1]
  out[#out + 1] = v[2]
  out[#out + 1] = v[3]
  out[#out + 1] = redis.call('SISMEMBER', KEYS[n + i], string.match(KEYS[i], '([^:]+)$'))
end
return out
"""


def _int(raw: bytes | None) -> int | None:
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None


class Redis:
    def __init__(self, url: str, prefix: str, shown_url: str) -> None:
        self.url = url
        self.prefix = prefix
        self.shown_url = shown_url
        self.client: Any = None
        self.script: Any = None

    async def open(self) -> None:
        self.client = aioredis.from_url(
            self.url, socket_timeout=30, socket_connect_timeout=connect_timeout_s
        )
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise AuditError("Redis", f"unreachable at {self.shown_url} ({exc})") from None
        self.script = self.client.register_script(READ_SCRIPT)

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()

    async def read(self, shard: int, keys: Sequence[str]) -> list[tuple[Found | None, bool]]:
        """Per `account|asset` key: the balance hash (None if absent) and whether the
        asset is listed in the account's asset set."""
        if not keys:
            return []
        split = [key.rpartition("|") for key in keys]
        names = [balance_key(self.prefix, shard, a, asset) for a, _, asset in split]
        names += [assets_key(self.prefix, shard, a) for a, _, _ in split]
        try:
            values = await self.script(keys=names)
        except (RedisError, OSError) as exc:
            raise AuditError("Redis", str(exc)) from None
        out: list[tuple[Found | None, bool]] = []
        for i in range(0, len(values), 4):
            available, held, seq, listed = values[i : i + 4]
            if available is None and held is None and seq is None:
                out.append((None, bool(listed)))
            else:
                out.append(((_int(available), _int(held), _int(seq)), bool(listed)))
        return out

    def _shard_of_key(self, key: bytes) -> int | None:
        text = key.decode()
        start = len(self.prefix) + 2
        end = text.find("}", start)
        return int(text[start:end]) if text[start:end].isdigit() else None

    async def counts(self) -> Counter[int]:
        """The number of balance keys of each shard (SCAN: keys are counted, not kept)."""
        counts: Counter[int] = Counter()
        try:
            async for key in self.client.scan_iter(
                match=f"{self.prefix}:{{*}}:balance:*", count=redis_scan_count
            ):
                shard = self._shard_of_key(key)
                if shard is not None:
                    counts[shard] += 1
        except (RedisError, OSError) as exc:
            raise AuditError("Redis", str(exc)) from None
        return counts

    async def keys_of(self, shard: int, size: int) -> AsyncGenerator[list[tuple[str, str]], None]:
        """A shard's balance keys as (account, asset), a page at a time, in SCAN order."""
        head = f"{self.prefix}:{{{shard}}}:balance:"
        page: list[tuple[str, str]] = []
        try:
            async for key in self.client.scan_iter(match=f"{head}*", count=redis_scan_count):
                account, _, asset = key.decode()[len(head) :].rpartition(":")
                page.append((account, asset))
                if len(page) >= size:
                    yield page
                    page = []
        except (RedisError, OSError) as exc:
            raise AuditError("Redis", str(exc)) from None
        if page:
            yield page

    async def value(self, shard: int, account: str, asset: str) -> Found | None:
        return (await self.read(shard, [sort_key(account, asset)]))[0][0]


# The engine -------------------------------------------------------------------------------

_decode_page = msgspec.json.Decoder(ShardPage).decode


class Engine:
    """The engine's table views through any worker's web server (it forwards a shard's
    requests to the worker that owns the shard)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        timeout = aiohttp.ClientTimeout(total=engine_page_timeout_s, connect=connect_timeout_s)
        self.session = aiohttp.ClientSession(timeout=timeout)
        try:
            async with self.session.get(f"{self.url}/livez") as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AuditError(
                "engine", f"no worker answers at {self.url} ({exc or type(exc).__name__})"
            ) from None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _get(self, shard: int, params: dict[str, str]) -> ShardPage:
        assert self.session is not None
        url = f"{self.url}/shards/{shard}/balances"
        deadline = time.monotonic() + engine_wait_s
        while True:
            try:
                async with self.session.get(url, params=params) as response:
                    body = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise AuditError("engine", f"GET {url}: {exc or type(exc).__name__}") from None
            if status == 200:
                return _decode_page(body)
            if status != 503 or time.monotonic() > deadline:
                detail = body.decode(errors="replace")[:300]
                raise AuditError("engine", f"GET {url}: {status} {detail}")
            await asyncio.sleep(1.0)  # a rebalance or a recovery: the shard comes back

    async def pages(self, shard: int, size: int) -> AsyncGenerator[list[tuple[str, Found]], None]:
        """The shard's balances, `size` a page, in key order. Balances that never changed
        (an overdraft limit set on an empty balance: seq 0) have no entry and are left out."""
        params = {"limit": str(size)}
        while True:
            page = await self._get(shard, params)
            yield [
                (sort_key(b.account, b.asset), (b.available, b.held, b.seq))
                for b in page.balances
                if b.seq > 0
            ]
            if page.next is None:
                return
            params["after"] = page.next

    async def value(self, account: str, asset: str) -> Found | None:
        """One balance, through the worker's table view of its account."""
        assert self.session is not None
        url = f"{self.url}/balances/{account}"
        try:
            async with self.session.get(url) as response:
                if response.status != 200:
                    text = (await response.text())[:300]
                    raise AuditError("engine", f"GET {url}: {response.status} {text}")
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AuditError("engine", f"GET {url}: {exc or type(exc).__name__}") from None
        found = body["balances"].get(asset)
        if found is None or found["seq"] == 0:
            return None
        return (found["available"], found["held"], found["seq"])


# The run ------------------------------------------------------------------------------------


@dataclass
class ShardTally:
    """What one shard's audit found, in bounded space: counts, sums per asset and the
    first `show` mismatches."""

    shard: int
    show: int
    compared: Counter[str] = field(default_factory=Counter)
    mismatches: Counter[str] = field(default_factory=Counter)
    first: list[Mismatch] = field(default_factory=list)
    sums: Counter[str] = field(default_factory=Counter)
    balances: int = 0

    def add(self, found: list[Mismatch]) -> None:
        for mismatch in found:
            self.mismatches[mismatch.kind] += 1
            if len(self.first) < self.show:
                self.first.append(mismatch)

    def count(self, row: LedgerRow | None, engine: Found | None, redis: Found | None) -> None:
        self.balances += 1
        if row is not None:
            ledger = row.ledger
            if ledger is not None:
                self.compared["ledger"] += 1
                self.sums[row.asset] += ledger[0] + ledger[1]
            if row.seq is not None:
                self.compared["postgres"] += 1
        if redis is not None:
            self.compared["redis"] += 1
        if engine is not None:
            self.compared["engine"] += 1


@dataclass
class Report:
    schema: str
    shards: int
    sources: list[str]
    skipped: list[str]
    balances: int
    compared: Counter[str]
    mismatches: Counter[str]
    first: list[Mismatch]
    flows: list[AssetFlow]
    seconds: float

    @property
    def ok(self) -> bool:
        return not sum(self.mismatches.values())


async def _empty() -> AsyncGenerator[list[tuple[str, Found]], None]:
    return
    yield


class Audit:
    """One audit of a deployment (the settings' topic prefix and shard count)."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine_url: str | None,
        with_redis: bool = True,
        show: int = show_default,
        batch_size: int = batch_size_default,
        say: Callable[[str], None] | None = None,
        progress_tty: bool | None = None,
    ) -> None:
        if not 1 <= batch_size <= batch_size_max:
            raise ValueError(f"batch_size must be within 1..{batch_size_max}")
        shown = settings.redacted()
        self.schema = settings.topic_prefix
        self.partitions = settings.partitions
        self.pg = Postgres(settings.pg_dsn, self.schema, shown["pg_dsn"])
        self.redis = (
            Redis(settings.redis_url, settings.topic_prefix, shown["redis_url"])
            if with_redis
            else None
        )
        self.engine = Engine(engine_url) if engine_url is not None else None
        self.show = show
        self.batch_size = batch_size
        self.say = say
        self.progress_tty = progress_tty

    async def run(self) -> Report:
        started = time.monotonic()
        try:
            # Fail fast, naming the store, before any long work.
            await self.pg.open(self.partitions)
            if self.redis is not None:
                await self.redis.open()
            if self.engine is not None:
                await self.engine.open()
            return await self._run(started)
        finally:
            await self.pg.close()
            if self.redis is not None:
                await self.redis.close()
            if self.engine is not None:
                await self.engine.close()

    async def _run(self, started: float) -> Report:
        total = await self.pg.count()
        tallies: list[ShardTally] = []
        shards = iter(range(self.partitions))
        with Progress(
            "audit", total, unit="balances", say=self.say, tty=self.progress_tty
        ) as progress:

            async def worker() -> None:
                for shard in shards:
                    tallies.append(await self._shard(shard, progress))

            try:
                async with asyncio.TaskGroup() as group:
                    flows_task = group.create_task(self.pg.flows())
                    counts_task = (
                        group.create_task(self.redis.counts()) if self.redis is not None else None
                    )
                    for _ in range(min(shards_in_flight, self.partitions)):
                        group.create_task(worker())
            except BaseExceptionGroup as group_error:
                raise _first_audit_error(group_error) from None
        tallies.sort(key=lambda t: t.shard)
        if counts_task is not None:
            counts = counts_task.result()
            for tally in tallies:
                if counts[tally.shard] > tally.compared["redis"]:
                    await self._redis_extras(tally)
        return self._report(tallies, flows_task.result(), time.monotonic() - started)

    async def _shard(self, shard: int, progress: Progress) -> ShardTally:
        tally = ShardTally(shard, self.show)
        pg_pages = self.pg.pages(shard, self.batch_size)
        engine_pages = (
            self.engine.pages(shard, self.batch_size) if self.engine is not None else _empty()
        )
        merged = aligned(pg_pages, engine_pages)
        with_engine = self.engine is not None
        with_redis = self.redis is not None
        async with (
            contextlib.aclosing(merged),
            contextlib.aclosing(pg_pages),
            contextlib.aclosing(engine_pages),
        ):
            try:
                async for chunk in merged:
                    redis = (
                        await self.redis.read(shard, [key for key, _, _ in chunk])
                        if self.redis is not None
                        else None
                    )
                    for i, (key, row, engine) in enumerate(chunk):
                        value, listed = redis[i] if redis is not None else (None, True)
                        tally.count(row, engine, value)
                        found = compare(
                            shard, key, row, engine, value,
                            with_engine=with_engine, with_redis=with_redis, redis_listed=listed,
                        )  # fmt: skip
                        if found:
                            tally.add(found)
                    progress.add(len(chunk))
            except OutOfOrder as exc:
                store = "PostgreSQL" if exc.side == "left" else "engine"
                raise AuditError(store, f"shard {shard}: {exc}") from None
        return tally

    async def _redis_extras(self, tally: ShardTally) -> None:
        """Name the Redis balances of a shard that neither PostgreSQL nor the engine has:
        its keys checked a page at a time (only when its key count says there are some)."""
        assert self.redis is not None
        shard = tally.shard
        pages = self.redis.keys_of(shard, self.batch_size)
        async with contextlib.aclosing(pages):
            async for page in pages:
                for account, asset in await self.pg.unknown(shard, page):
                    if (
                        self.engine is not None
                        and shard_of(account, self.partitions) == shard
                        and await self.engine.value(account, asset) is not None
                    ):
                        continue  # an engine-only balance: the merge reported it already
                    value = await self.redis.value(shard, account, asset)
                    seq = value[2] if value is not None else None
                    tally.add(
                        [Mismatch("redis", shard, account, asset, seq,
                                  "(ledger) no balance (no ledger entries)",
                                  f"(Redis) {describe(value)}")]
                    )  # fmt: skip

    def _report(
        self, tallies: list[ShardTally], flows: dict[tuple[str, str], int], seconds: float
    ) -> Report:
        compared: Counter[str] = Counter()
        mismatches: Counter[str] = Counter()
        sums: Counter[str] = Counter()
        first: list[Mismatch] = []
        for tally in tallies:
            compared.update(tally.compared)
            mismatches.update(tally.mismatches)
            sums.update(tally.sums)
            first.extend(tally.first)
        assets = asset_flows(dict(sums), flows)
        wrong = sum(not f.ok for f in assets)
        if wrong:
            mismatches["conservation"] += wrong
        sources = ["postgres"]
        skipped: list[str] = []
        for name, source in (("redis", self.redis), ("engine", self.engine)):
            (sources if source is not None else skipped).append(name)
        return Report(
            schema=self.schema,
            shards=self.partitions,
            sources=sources,
            skipped=skipped,
            balances=sum(t.balances for t in tallies),
            compared=compared,
            mismatches=mismatches,
            first=first[: self.show],
            flows=assets,
            seconds=seconds,
        )


def _first_audit_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The AuditError inside a task group's failure (what the user needs to read), else
    the first error as it is."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            error = _first_audit_error(error)
        if isinstance(error, AuditError):
            return error
    return group.exceptions[0]


# The summary ----------------------------------------------------------------------------------


def render(report: Report) -> str:
    lines = [
        f"tally audit: schema {report.schema!r}, {report.shards} shards, "
        f"{report.balances:,} balances in {report.seconds:.1f}s",
        "  each store against the ledger (last breakpoint + later entries):",
        f"    {'ledger (recomputed)':<22}{report.compared['ledger']:>12,} balances",
    ]
    for source in report.sources:
        bad = report.mismatches[source]
        mark = "ok" if not bad else "FAIL"
        lines.append(
            f"    {STORES[source]:<22}{report.compared[source]:>12,} balances"
            f"  [{mark:>4}] {bad:,} differ"
        )
    for source in report.skipped:
        lines.append(f"    {STORES[source]:<22}{'skipped':>12}")
    gaps, breaks = report.mismatches["seq_gap"], report.mismatches["breakpoint"]
    lines += [
        "  the ledger itself:",
        f"    [{'ok' if not gaps else 'FAIL':>4}] seq 1..n without gaps: "
        f"{gaps:,} balances with gaps",
        f"    [{'ok' if not breaks else 'FAIL':>4}] breakpoints agree with all entries: "
        f"{breaks:,} differ",
    ]
    wrong = report.mismatches["conservation"]
    lines.append(
        f"    [{'ok' if not wrong else 'FAIL':>4}] conservation per asset "
        "(balances = deposits - withdrawals - captures out):"
    )
    lines += [f"           {flow.line()}" for flow in report.flows] or ["           no money"]
    if report.ok:
        lines.append("result: everything agrees")
        return "\n".join(lines)
    total = sum(report.mismatches.values())
    by_kind = ", ".join(f"{k} {report.mismatches[k]:,}" for k in KINDS if report.mismatches[k])
    lines.append(f"mismatches: {total:,} ({by_kind})")
    if report.first:
        lines.append(f"first {len(report.first)}:")
        lines += [f"  {m.line()}" for m in report.first]
    lines.append(f"result: {total:,} mismatch{'es' if total != 1 else ''}")
    return "\n".join(lines)
