"""What the audit reads and reports, shared by its sources and its checks: its limits,
one balance's row from the ledger, the key order every source is read in, a mismatch,
and the error that stops an audit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from core.errors import CANNOT_RUN, TallyError
from streams.client import shard_page_limit_max

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
