"""One shard's state in RocksDB (rocksdict), mirrored to the shard's changelog partition.

The store is the `StateView` the ledger reads. Writes of a batch of commands collect in
`pending` (latest value per key, None for a deletion) and are read back from there, so
the batch sees its own effects; nothing reaches RocksDB until the batch's Kafka
transaction has committed. Then `flush` writes the batch and the changelog offset it
reached in one RocksDB write batch, atomically. A crash between the Kafka commit and
`flush` leaves RocksDB behind the changelog, never ahead of it, and the next start
reads the changelog from the stored offset to catch up. An aborted batch is `discard`ed.

Keys carry their table as a prefix: `b|account|asset` balances, `a|account` account
settings, `h|account|hold_id` open holds, `c|account|command_id` idempotency records. The
same keys and values go to the changelog, so recovery is a plain copy. Values are the
msgspec array encodings of `streams.state`.

Idempotency is scoped by (account, command_id): the same id on two accounts is two
commands, whichever shards the accounts hash to. Stores and changelogs written before
that hold `c|command_id` records (legacy, shard-scoped: ids hold no '|', so the two
layouts never collide). Such a record is still consulted when an (account, id) has no
record of its own, so that a command applied under the old layout cannot apply twice
after the upgrade; it answers as it did then (a retry is `duplicate`, the id on another
account of the shard `command_id_reused`) until retention prunes it, and new records
are only written in the new layout. Nothing is rewritten: the old records age out.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import msgspec
from rocksdict import Options, Rdict, WriteBatch

from streams.ledger import Outcome
from streams.state import AccountState, BalanceState, CommandRecord, HoldState

log = logging.getLogger(__name__)

_balance = msgspec.json.Decoder(BalanceState)
_account = msgspec.json.Decoder(AccountState)
_hold = msgspec.json.Decoder(HoldState)
_record = msgspec.json.Decoder(CommandRecord)
_encode = msgspec.json.Encoder().encode

BALANCE = b"b|"
ACCOUNT = b"a|"
HOLD = b"h|"
COMMAND = b"c|"
# Not a table row: where in the changelog partition this copy of the shard has got to.
# '\x00' sorts before every table prefix and never occurs in ids.
_OFFSET = b"\x00changelog-offset|"


def balance_key(account: str, asset: str) -> bytes:
    return b"b|%s|%s" % (account.encode(), asset.encode())


def account_key(account: str) -> bytes:
    return b"a|" + account.encode()


def hold_key(account: str, hold_id: str) -> bytes:
    return b"h|%s|%s" % (account.encode(), hold_id.encode())


def command_key(account: str, command_id: str) -> bytes:
    return b"c|%s|%s" % (account.encode(), command_id.encode())


def legacy_command_key(command_id: str) -> bytes:
    """The shard-scoped key of an idempotency record written before (account, id) scope."""
    return b"c|" + command_id.encode()


# (account, command_id) of an idempotency record; account None for a legacy record.
CommandName = tuple[str | None, str]


def _command_name(key: bytes) -> CommandName:
    account, bar, command_id = key[2:].decode().partition("|")
    return (account, command_id) if bar else (None, account)


def _options() -> Options:
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    return options


class ShardStore:
    """The state of one shard: RocksDB under `path`, the changelog partition it mirrors."""

    def __init__(self, path: Path, changelog_topic: str) -> None:
        self.path = path
        self.changelog_topic = changelog_topic
        path.parent.mkdir(parents=True, exist_ok=True)
        # True when the local copy could not be opened and was started afresh: the
        # caller then rebuilds it from the changelog (offset 0).
        self.rebuilt = False
        try:
            self.db = Rdict(str(path), _options())
        except Exception as exc:  # rocksdict raises plain Exception("Corruption: ...")
            # Local state is a cache of the changelog: a damaged copy (a truncated .sst,
            # a lost MANIFEST) is thrown away, never repaired or half-trusted.
            log.warning("%s: local state unreadable (%s); rebuilding it from the changelog",
                        path, str(exc).splitlines()[0])  # fmt: skip
            shutil.rmtree(path, ignore_errors=True)
            self.db = Rdict(str(path), _options())
            self.rebuilt = True
        self.pending: dict[bytes, bytes | None] = {}

    # Reads (the ledger's StateView) -------------------------------------------------------

    def _get(self, key: bytes) -> bytes | None:
        if key in self.pending:
            return self.pending[key]
        value: bytes | None = self.db.get(key)
        return value

    def balance(self, account: str, asset: str) -> BalanceState | None:
        raw = self._get(balance_key(account, asset))
        return None if raw is None else _balance.decode(raw)

    def account(self, account: str) -> AccountState | None:
        raw = self._get(account_key(account))
        return None if raw is None else _account.decode(raw)

    def hold(self, account: str, hold_id: str) -> HoldState | None:
        raw = self._get(hold_key(account, hold_id))
        return None if raw is None else _hold.decode(raw)

    def command(self, account: str, command_id: str) -> CommandRecord | None:
        raw = self._get(command_key(account, command_id))
        if raw is None:
            raw = self._get(legacy_command_key(command_id))  # see the module's docstring
        return None if raw is None else _record.decode(raw)

    # Writes ------------------------------------------------------------------------------

    def commit(self, outcome: Outcome) -> None:
        """Stage what an outcome changed; it becomes durable with the batch's transaction."""
        pending = self.pending
        for (account, asset), bal in outcome.balances.items():
            pending[balance_key(account, asset)] = _encode(bal)
        for account, acct in outcome.accounts.items():
            pending[account_key(account)] = _encode(acct)
        for (account, hold_id), held in outcome.holds.items():
            pending[hold_key(account, hold_id)] = None if held is None else _encode(held)
        if outcome.record is not None:
            result = outcome.result
            pending[command_key(result.account, result.command_id)] = _encode(outcome.record)

    def forget_command(self, name: CommandName) -> None:
        """Stage the removal of an idempotency record whose retention has passed."""
        account, command_id = name
        if account is None:
            key = legacy_command_key(command_id)
        else:
            key = command_key(account, command_id)
        self.pending[key] = None

    def flush(self, changelog_next_offset: int | None) -> None:
        """Write the staged batch, and how far the changelog now is, atomically."""
        batch = WriteBatch(raw_mode=True)
        for key, value in self.pending.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        if changelog_next_offset is not None:
            batch.put(self._offset_key, b"%d" % changelog_next_offset)
        self.db.write(batch)
        self.pending.clear()

    def discard(self) -> None:
        self.pending.clear()

    # Recovery ----------------------------------------------------------------------------

    @property
    def _offset_key(self) -> bytes:
        return _OFFSET + self.changelog_topic.encode()

    def changelog_offset(self) -> int:
        """The changelog offset to resume recovery from (0 for a new store)."""
        raw = self.db.get(self._offset_key)
        return 0 if raw is None else int(raw)

    def restore(self, records: list[tuple[bytes, bytes | None]], next_offset: int) -> None:
        """Apply changelog records read during recovery, in one write batch."""
        batch = WriteBatch(raw_mode=True)
        for key, value in records:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        batch.put(self._offset_key, b"%d" % next_offset)
        self.db.write(batch)

    def wipe(self) -> None:
        """Drop every key: the changelog no longer matches (a recreated topic)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self.db = Rdict(str(self.path), _options())
        self.pending.clear()

    def close(self) -> None:
        # Flushed to .sst files on a clean stop: the next start opens them instead of
        # replaying the write-ahead log.
        with contextlib.suppress(Exception):
            self.db.flush()
        self.db.close()

    # Scans -------------------------------------------------------------------------------

    def _scan(self, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        for key, value in self.db.items(from_key=start or prefix):
            # raw mode: keys and values are bytes (the stubs cover every mode).
            assert isinstance(key, bytes) and isinstance(value, bytes)
            if not key.startswith(prefix):
                return
            yield key, value

    def balances_of(self, account: str) -> dict[str, BalanceState]:
        """Every asset's committed balance of one account (for the table view)."""
        raw = self.db.get(account_key(account))
        out: dict[str, BalanceState] = {}
        for asset in _account.decode(raw).assets if raw is not None else ():
            bal = self.db.get(balance_key(account, asset))
            if bal is not None:
                out[asset] = _balance.decode(bal)
        return out

    def balances(
        self, after: tuple[str, str] | None = None
    ) -> Iterator[tuple[str, str, BalanceState]]:
        """The committed balances of the shard as (account, asset, balance), in key order,
        all of them or those after the (account, asset) `after`."""
        start = None if after is None else balance_key(*after)
        for key, raw in self._scan(BALANCE, start):
            if key == start:
                continue
            account, _, asset = key[2:].decode().rpartition("|")
            yield account, asset, _balance.decode(raw)

    def open_holds(self) -> Iterator[tuple[str, str, HoldState]]:
        """Every committed open hold as (account, hold_id, hold)."""
        for key, raw in self._scan(HOLD):
            account, _, hold_id = key[2:].decode().partition("|")
            yield account, hold_id, _hold.decode(raw)

    def commands_from(
        self, start: bytes | None, limit: int
    ) -> tuple[list[tuple[CommandName, CommandRecord]], bytes | None]:
        """Up to `limit` committed idempotency records (legacy ones included) from key
        `start` on, and the key to continue from next time (None once the end is reached)."""
        out: list[tuple[CommandName, CommandRecord]] = []
        for key, raw in self._scan(COMMAND, start):
            if len(out) == limit:
                return out, key
            out.append((_command_name(key), _record.decode(raw)))
        return out, None
