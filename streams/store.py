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
same keys and values go to the changelog, so recovery is a plain copy, with one
exception: the idempotency records. Every command leaves one, so one changelog record
each would be half the changelog; instead a batch's records travel as one group record,
`g|<at_ms>|<token>` (more than one if they pass `group_bytes_max`), whose value lists
the `c|` keys and values (`changelog`). The store keeps the group beside the records it
holds; recovery expands a group into its records (`restore`). A batch's records share
its time, and retention ages them out together: pruning deletes the group (one
tombstone in the changelog) and its records with it (local deletions only,
`forget_group`). Values are the msgspec array encodings of `streams.state`.

Idempotency is scoped by (account, command_id): the same id on two accounts is two
commands, whichever shards the accounts hash to. Stores and changelogs written before
that hold `c|command_id` records (legacy, shard-scoped: ids hold no '|', so the two
layouts never collide). Such a record is still consulted when an (account, id) has no
record of its own, so that a command applied under the old layout cannot apply twice
after the upgrade; it answers as it did then (a retry is `duplicate`, the id on another
account of the shard `command_id_reused`) until retention prunes it, and new records
are only written in the new layout. Nothing is rewritten: the old records age out.
A store this engine made empty is marked as holding none (`_NO_LEGACY`), and its reads
skip the legacy key, a second lookup for every new command; recovery takes the mark away
with the first legacy record it copies in from the changelog. A store without the mark
(an older engine's files) keeps looking.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec
from rocksdict import BlockBasedOptions, Options, Rdict, WriteBatch

from streams.ledger import Outcome
from streams.state import AccountState, BalanceState, CommandRecord, HoldState

log = logging.getLogger(__name__)

_balance = msgspec.json.Decoder(BalanceState)
_account = msgspec.json.Decoder(AccountState)
_hold = msgspec.json.Decoder(HoldState)
_record = msgspec.json.Decoder(CommandRecord)
_group = msgspec.json.Decoder(list[tuple[str, msgspec.Raw]])
_encode = msgspec.json.Encoder().encode

BALANCE = b"b|"
ACCOUNT = b"a|"
HOLD = b"h|"
COMMAND = b"c|"
GROUP = b"g|"
# The changelog's layout, agreed by every worker of a group (streams.agreement): a worker
# that does not know group records would take a shard's idempotency records for unknown
# keys and forget them. 2: a batch's idempotency records travel as group records.
CHANGELOG_FORMAT = 2
# A group record's value stays far below limits.OUTPUT_BYTES_MAX (a batch of 5,000
# commands with long ids makes several groups, each well inside one Kafka batch).
group_bytes_max = 256 * 1024
# Not a table row: where in the changelog partition this copy of the shard has got to.
# '\x00' sorts before every table prefix and never occurs in ids.
_OFFSET = b"\x00changelog-offset|"
# What `pending` answers for a key the batch has not staged (None there is a deletion).
_UNSTAGED = object()
# Not a table row either: present in a store that has never held a legacy idempotency
# record (made empty by an engine that writes none, and restored only from records in
# the new layout since), whose reads then skip the legacy key.
_NO_LEGACY = b"\x00no-legacy-commands"


def balance_key(account: str, asset: str) -> bytes:
    return b"b|%s|%s" % (account.encode(), asset.encode())


def account_key(account: str) -> bytes:
    return b"a|" + account.encode()


def hold_key(account: str, hold_id: str) -> bytes:
    return b"h|%s|%s" % (account.encode(), hold_id.encode())


def command_key(account: str, command_id: str) -> bytes:
    return b"c|%s|%s" % (account.encode(), command_id.encode())


def group_key(at_ms: int, token: str) -> bytes:
    """A group of idempotency records written at `at_ms` (zero-padded: groups sort by
    time, so pruning reads the oldest first and stops at the first one too young)."""
    return b"g|%016d|%s" % (at_ms, token.encode())


def _group_time(key: bytes) -> int | None:
    digits = key[2:18]
    return int(digits) if len(digits) == 16 and digits.isdigit() else None


def _group_entries(value: bytes) -> list[tuple[str, msgspec.Raw]]:
    """A group record's (key, value) entries; none for a value that is not a group (a
    record the engine did not write stops neither recovery nor pruning)."""
    try:
        return _group.decode(value)
    except msgspec.DecodeError:
        log.warning("a group record that is not one (%d bytes) is kept as it is", len(value))
        return []


def _record_time(raw: bytes) -> int:
    """An idempotency record's time; never old for one that does not decode."""
    try:
        return _record.decode(raw).at_ms
    except msgspec.DecodeError:
        return 2**63


def _is_legacy(key: bytes) -> bool:
    """Whether a key is a legacy idempotency record's ("c|<id>": ids hold no '|')."""
    return key.startswith(COMMAND) and b"|" not in key[2:]


def legacy_command_key(command_id: str) -> bytes:
    """The shard-scoped key of an idempotency record written before (account, id) scope."""
    return b"c|" + command_id.encode()


# (account, command_id) of an idempotency record; account None for a legacy record.
CommandName = tuple[str | None, str]


def _command_name(key: bytes) -> CommandName:
    account, bar, command_id = key[2:].decode().partition("|")
    return (account, command_id) if bar else (None, account)


# Bits per key of the bloom filters: most reads of a batch ask for keys that do not exist
# (a new command's idempotency record, and its legacy key), and without a filter each
# such miss searches the memtable and every level; 10 bits make 99% of misses cheap.
bloom_bits_per_key = 10
memtable_bloom_ratio = 0.1


def _options() -> Options:
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    table = BlockBasedOptions()
    table.set_bloom_filter(bloom_bits_per_key, False)
    options.set_block_based_table_factory(table)
    options.set_memtable_prefix_bloom_ratio(memtable_bloom_ratio)
    options.set_memtable_whole_key_filtering(True)
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
        # The balances and account settings read or staged since the last flush, decoded
        # (None: no such row): a batch reads an account's settings and balance once per
        # command (its status, and again its assets when a balance moves), and a busy
        # account's many times; each read from here saves a key, a lookup and a decode.
        self._balances: dict[tuple[str, str], BalanceState | None] = {}
        self._accounts: dict[str, AccountState | None] = {}
        # Keys in `pending` the changelog carries inside group records, not on their own,
        # and those of them not in a group yet (see the module's docstring).
        self._unlogged: set[bytes] = set()
        self._ungrouped: list[tuple[bytes, int]] = []  # (key, the record's at_ms)
        self._legacy = self._may_hold_legacy()

    def _may_hold_legacy(self) -> bool:
        """Whether this copy may hold legacy idempotency records: a store written by an
        engine before the marker existed may; one this engine made empty is marked."""
        if self.db.get(_NO_LEGACY) is not None:
            return False
        if next(iter(self.db.keys()), None) is not None:
            return True
        self.db.put(_NO_LEGACY, b"")
        return False

    # Reads (the ledger's StateView) -------------------------------------------------------

    def _get(self, key: bytes) -> bytes | None:
        value = self.pending.get(key, _UNSTAGED)
        if value is _UNSTAGED:
            value = self.db.get(key)
        return value  # type: ignore[return-value]

    def balance(self, account: str, asset: str) -> BalanceState | None:
        found = self._balances.get((account, asset), _UNSTAGED)
        if found is _UNSTAGED:
            raw = self._get(balance_key(account, asset))
            found = self._balances[(account, asset)] = None if raw is None else _balance.decode(raw)
        return found  # type: ignore[return-value]

    def account(self, account: str) -> AccountState | None:
        found = self._accounts.get(account, _UNSTAGED)
        if found is _UNSTAGED:
            raw = self._get(account_key(account))
            found = self._accounts[account] = None if raw is None else _account.decode(raw)
        return found  # type: ignore[return-value]

    def hold(self, account: str, hold_id: str) -> HoldState | None:
        raw = self._get(hold_key(account, hold_id))
        return None if raw is None else _hold.decode(raw)

    def command(self, account: str, command_id: str) -> CommandRecord | None:
        raw = self._get(command_key(account, command_id))
        if raw is None and self._legacy:
            raw = self._get(legacy_command_key(command_id))  # see the module's docstring
        return None if raw is None else _record.decode(raw)

    # Writes ------------------------------------------------------------------------------

    def commit(self, outcome: Outcome) -> None:
        """Stage what an outcome changed; it becomes durable with the batch's transaction."""
        pending = self.pending
        for (account, asset), bal in outcome.balances.items():
            pending[balance_key(account, asset)] = _encode(bal)
            self._balances[(account, asset)] = bal
        for account, acct in outcome.accounts.items():
            pending[account_key(account)] = _encode(acct)
            self._accounts[account] = acct
        for (account, hold_id), held in outcome.holds.items():
            pending[hold_key(account, hold_id)] = None if held is None else _encode(held)
        if outcome.record is not None:
            result = outcome.result
            key = command_key(result.account, result.command_id)
            pending[key] = _encode(outcome.record)
            self._unlogged.add(key)
            self._ungrouped.append((key, outcome.record.at_ms))

    def forget_command(self, name: CommandName) -> None:
        """Stage the removal of an idempotency record whose retention has passed."""
        account, command_id = name
        if account is None:
            key = legacy_command_key(command_id)
        else:
            key = command_key(account, command_id)
        self.pending[key] = None

    def forget_group(self, key: bytes, members: Iterable[bytes]) -> None:
        """Stage the removal of a group record and of the idempotency records it holds
        (see `groups_before`): one deletion in the changelog, the others local only."""
        self.pending[key] = None
        for member in members:
            self.pending[member] = None
            self._unlogged.add(member)

    def changelog(self) -> list[tuple[bytes, bytes | None]]:
        """What the staged batch writes to the changelog: every key it changed, once, with
        its last value, except the new idempotency records, which go inside group
        records (staged here too, so that the store keeps them)."""
        ungrouped, self._ungrouped = self._ungrouped, []
        group: list[tuple[str, msgspec.Raw]] = []
        size = at_ms = 0
        for key, record_at_ms in ungrouped:
            value = self.pending[key]
            assert value is not None  # a record staged by `commit` this batch
            group.append((key[2:].decode(), msgspec.Raw(value)))
            size += len(key) + len(value) + 8
            at_ms = max(at_ms, record_at_ms)
            if size >= group_bytes_max:
                self._stage_group(group, at_ms)
                group, size, at_ms = [], 0, 0
        if group:
            self._stage_group(group, at_ms)
        unlogged = self._unlogged
        return [(k, v) for k, v in self.pending.items() if k not in unlogged]

    def _stage_group(self, group: list[tuple[str, msgspec.Raw]], at_ms: int) -> None:
        """Stage one group record, named by its newest record's time (`at_ms`, carried
        from `commit` rather than decoded again from the values)."""
        self.pending[group_key(at_ms, uuid.uuid4().hex)] = _encode(group)

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
        self.discard()

    def discard(self) -> None:
        self.pending.clear()
        self._unlogged.clear()
        self._ungrouped.clear()
        self._forget_reads()

    def _forget_reads(self) -> None:
        """Drop the decoded reads: after each batch, committed or not, and whenever the
        rows change under them (recovery, a wipe)."""
        self._balances.clear()
        self._accounts.clear()

    # Recovery ----------------------------------------------------------------------------

    @property
    def _offset_key(self) -> bytes:
        return _OFFSET + self.changelog_topic.encode()

    def changelog_offset(self) -> int:
        """The changelog offset to resume recovery from (0 for a new store)."""
        raw = self.db.get(self._offset_key)
        return 0 if raw is None else int(raw)

    def restore(self, records: list[tuple[bytes, bytes | None]], next_offset: int) -> None:
        """Apply changelog records read during recovery, in one write batch: each as it
        is, a group record also expanded into its idempotency records (and a deleted
        group's records deleted with it)."""
        staged: dict[bytes, bytes | None] = {}
        for key, value in records:
            if key.startswith(GROUP):
                self._restore_group(staged, key, value)
            staged[key] = value
        batch = WriteBatch(raw_mode=True)
        for key, value in staged.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
                if not self._legacy and _is_legacy(key):
                    self._legacy = True  # an older engine's record, from the changelog
                    batch.delete(_NO_LEGACY)
        batch.put(self._offset_key, b"%d" % next_offset)
        self.db.write(batch)
        self._forget_reads()

    def _restore_group(
        self, staged: dict[bytes, bytes | None], key: bytes, value: bytes | None
    ) -> None:
        if value is not None:
            for name, raw in _group_entries(value):
                staged[COMMAND + name.encode()] = bytes(raw)
            return
        held = staged[key] if key in staged else self.db.get(key)
        if held is not None:
            for member in self._members(key, held, staged):
                staged[member] = None

    def _members(
        self, key: bytes, value: bytes, staged: dict[bytes, bytes | None] | None = None
    ) -> list[bytes]:
        """The idempotency records of a group that are still the ones it wrote: a record
        pruned on its own (an older worker's way) and written again later by a new
        command with the same id is younger than the group, and is not the group's."""
        at_ms = _group_time(key)
        members: list[bytes] = []
        if at_ms is None:
            return members
        for name, _ in _group_entries(value):
            member = COMMAND + name.encode()
            held = staged[member] if staged is not None and member in staged else self._get(member)
            if held is not None and _record_time(held) <= at_ms:
                members.append(member)
        return members

    def wipe(self) -> None:
        """Drop every key: the changelog no longer matches (a recreated topic)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self.db = Rdict(str(self.path), _options())
        self.discard()
        self._legacy = self._may_hold_legacy()

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

    def groups_before(self, cutoff_ms: int, limit: int) -> list[tuple[bytes, list[bytes]]]:
        """Up to `limit` committed group records older than `cutoff_ms`, oldest first,
        each with the keys of the idempotency records it still holds."""
        out: list[tuple[bytes, list[bytes]]] = []
        for key, value in self._scan(GROUP):
            at_ms = _group_time(key)
            if len(out) == limit or (at_ms is not None and at_ms >= cutoff_ms):
                break
            if at_ms is not None:
                out.append((key, self._members(key, value)))
        return out

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
