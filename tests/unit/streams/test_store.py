"""ShardStore: a batch reads its own staged writes, nothing reaches RocksDB before flush,
flush stores the data and the changelog offset together, and recovery is a plain copy."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from rocksdict import Rdict

from streams import ledger
from streams.state import BalanceState, CommandRecord, HoldState
from streams.store import (
    _NO_LEGACY,
    GROUP,
    ShardStore,
    _options,
    balance_key,
    command_key,
    group_bytes_max,
    hold_key,
    legacy_command_key,
)
from topics.schema import Configure, Deposit, Hold, Reason, Release, Status


def _store(tmp_path: Path) -> ShardStore:
    return ShardStore(tmp_path / "shard-0", "app-state-changelog")


def test_a_batch_reads_its_own_writes_and_flush_makes_them_durable(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.commit(
        ledger.apply(store, Deposit(command_id="d1", account="a", asset="USD", amount=5), 1)
    )
    store.commit(
        ledger.apply(store, Deposit(command_id="d2", account="a", asset="USD", amount=7), 2)
    )
    bal = store.balance("a", "USD")
    assert bal is not None and (bal.available, bal.seq) == (12, 2)
    assert store.db.get(balance_key("a", "USD")) is None  # staged only
    assert store.changelog_offset() == 0
    store.flush(42)
    assert store.pending == {}
    assert store.changelog_offset() == 42
    store.close()
    again = _store(tmp_path)
    assert again.balances_of("a")["USD"].available == 12
    assert again.command("a", "d1") is not None and again.changelog_offset() == 42


def test_discard_forgets_an_aborted_batch(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.commit(
        ledger.apply(store, Deposit(command_id="d1", account="a", asset="USD", amount=5), 1)
    )
    store.flush(1)
    store.commit(
        ledger.apply(store, Deposit(command_id="d2", account="a", asset="USD", amount=7), 2)
    )
    store.discard()
    bal = store.balance("a", "USD")
    assert bal is not None and (bal.available, bal.seq) == (5, 1)
    assert store.command("a", "d2") is None
    assert store.changelog_offset() == 1


def test_a_released_hold_is_a_deletion_in_the_changelog(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for cmd in (
        Deposit(command_id="d1", account="a", asset="USD", amount=50),
        Hold(command_id="h1", account="a", hold_id="H", asset="USD", amount=20),
    ):
        store.commit(ledger.apply(store, cmd, 1))
    store.flush(3)
    assert [hold_id for _, hold_id, _ in store.open_holds()] == ["H"]
    store.commit(ledger.apply(store, Release(command_id="r1", account="a", hold_id="H"), 2))
    deletions = [key for key, value in store.pending.items() if value is None]
    assert deletions == [b"h|a|H"]
    store.flush(4)
    assert list(store.open_holds()) == []


def test_restore_copies_changelog_records_and_the_offset(tmp_path: Path) -> None:
    source = ShardStore(tmp_path / "source", "cl")
    source.commit(
        ledger.apply(source, Deposit(command_id="d1", account="a", asset="EUR", amount=9), 1)
    )
    records = list(source.pending.items())
    target = ShardStore(tmp_path / "target", "cl")
    target.restore(records, 17)
    assert target.balances_of("a")["EUR"].available == 9
    assert target.changelog_offset() == 17
    target.restore([(command_key("a", "d1"), None)], 18)
    assert target.command("a", "d1") is None


def test_rows_read_before_a_restore_or_a_wipe_are_read_again_after_it(tmp_path: Path) -> None:
    """The store keeps the balances and account settings it read decoded until the
    batch ends; rows that change under them (recovery, a wipe) are read afresh."""
    source = ShardStore(tmp_path / "source", "cl")
    for cmd in (
        Deposit(command_id="d1", account="a", asset="EUR", amount=9),
        Configure(command_id="f1", account="a", status="frozen"),
    ):
        source.commit(ledger.apply(source, cmd, 1))
    records = list(source.pending.items())
    target = ShardStore(tmp_path / "target", "cl")
    assert target.balance("a", "EUR") is None and target.account("a") is None
    target.restore(records, 2)
    restored = target.balance("a", "EUR")
    assert restored is not None and restored.available == 9
    account = target.account("a")
    assert account is not None and account.status == "frozen"
    target.wipe()
    assert target.balance("a", "EUR") is None and target.account("a") is None


def test_commands_are_paged_for_pruning(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for i in range(5):
        cmd = Deposit(command_id=f"c{i}", account="a", asset="USD", amount=1)
        store.commit(ledger.apply(store, cmd, 100 + i))
    store.flush(None)
    first, cursor = store.commands_from(None, 3)
    assert [name for name, _ in first] == [("a", "c0"), ("a", "c1"), ("a", "c2")]
    assert cursor is not None
    rest, cursor = store.commands_from(cursor, 3)
    assert [name for name, _ in rest] == [("a", "c3"), ("a", "c4")] and cursor is None
    assert [rec.at_ms for _, rec in first + rest] == [100, 101, 102, 103, 104]
    store.forget_command(("a", "c0"))
    store.flush(None)
    assert store.command("a", "c0") is None and store.command("a", "c1") is not None


# Value encodings at the money bounds (issue 14) ---------------------------------------

MONEY_BOUNDS = [1, 2**53, 2**63 - 1, 2**63, 2**64, 2**127 - 1, 2**128, -(2**127 - 1)]


@pytest.mark.parametrize("value", MONEY_BOUNDS)
def test_balance_and_hold_values_round_trip_exactly_at_every_bound(
    tmp_path: Path, value: int
) -> None:
    """The table values are msgspec JSON arrays: integers of any width, exactly."""
    bal = BalanceState(value, abs(value), 3, abs(value))
    held = HoldState("USD", abs(value), None)
    assert msgspec.json.decode(msgspec.json.encode(bal), type=BalanceState) == bal
    assert msgspec.json.encode(bal) == b"[%d,%d,3,%d]" % (value, abs(value), abs(value))
    store = _store(tmp_path)
    store.restore(
        [(balance_key("a", "USD"), msgspec.json.encode(bal)),
         (hold_key("a", "h"), msgspec.json.encode(held))],
        1,
    )  # fmt: skip
    store.close()
    again = _store(tmp_path)
    assert again.balance("a", "USD") == bal
    assert again.hold("a", "h") == held


def test_a_store_written_in_the_64_bit_format_is_read_and_grows_past_it(tmp_path: Path) -> None:
    """Records as today's engine and changelog hold them (the bytes the 64-bit engine
    wrote) decode unchanged, and the next deposit takes the balance past 2^64."""
    old = [
        (balance_key("a", "USD"), b"[9223372036854775807,0,7,0]"),
        (b"a|a", b'["active",["USD"]]'),
        (hold_key("a", "h"), b'["USD",9223372036854775807,null]'),
    ]
    store = _store(tmp_path)
    store.restore(old, 3)
    assert store.balance("a", "USD") == BalanceState(2**63 - 1, 0, 7, 0)
    assert store.hold("a", "h") == HoldState("USD", 2**63 - 1, None)
    out = ledger.apply(store, Deposit(command_id="d", account="a", asset="USD", amount=2**64), 1)
    store.commit(out)
    store.flush(4)
    assert store.balance("a", "USD") == BalanceState(2**63 - 1 + 2**64, 0, 8, 0)
    assert store.db.get(balance_key("a", "USD")) == b"[27670116110564327423,0,8,0]"


def test_the_same_command_id_on_two_accounts_of_one_shard_is_two_commands(
    tmp_path: Path,
) -> None:
    # Issue #13 finding 4: ids were shard-scoped, so this was command_id_reused when the
    # accounts shared a shard and two commands when they did not.
    store = _store(tmp_path)
    for account in ("alice", "bob"):
        cmd = Deposit(command_id="order-1", account=account, asset="USD", amount=5)
        outcome = ledger.apply(store, cmd, 1)
        assert (outcome.result.status, outcome.result.reason) == (Status.APPLIED, None)
        store.commit(outcome)
    store.flush(2)
    assert [name for name, _ in store.commands_from(None, 10)[0]] == [
        ("alice", "order-1"),
        ("bob", "order-1"),
    ]
    retry = ledger.apply(
        store, Deposit(command_id="order-1", account="bob", asset="USD", amount=5), 2
    )
    assert retry.result.status is Status.DUPLICATE


def _legacy_store(tmp_path: Path) -> ShardStore:
    """A store as the engine wrote it before (account, id) scope: "c|<id>" records, here
    restored from a changelog the way a worker upgraded in place would find it."""
    old = ShardStore(tmp_path / "old", "cl")
    cmd = Deposit(command_id="d1", account="alice", asset="USD", amount=9)
    outcome = ledger.apply(old, cmd, 100)
    old.commit(outcome)
    records = [
        (legacy_command_key("d1") if key.startswith(b"c|") else key, value)
        for key, value in old.pending.items()
    ]
    assert records[-1][0] == b"c|d1"
    store = ShardStore(tmp_path / "shard", "cl")
    store.restore(records, len(records))
    return store


def test_a_command_applied_under_the_old_layout_never_applies_twice(tmp_path: Path) -> None:
    store = _legacy_store(tmp_path)
    again = Deposit(command_id="d1", account="alice", asset="USD", amount=9)
    outcome = ledger.apply(store, again, 200)
    assert outcome.result.status is Status.DUPLICATE and outcome.record is None
    assert outcome.result.first is not None and outcome.result.first.at_ms == 100
    # Shard-scoped as before until retention prunes it: another account of the shard.
    other = ledger.apply(store, Deposit(command_id="d1", account="bob", asset="USD", amount=9), 200)
    assert other.result.reason is Reason.COMMAND_ID_REUSED
    assert store.balance("alice", "USD") is not None
    assert store.balance("alice", "USD").available == 9  # type: ignore[union-attr]


def test_legacy_records_are_pruned_like_new_ones(tmp_path: Path) -> None:
    store = _legacy_store(tmp_path)
    store.commit(
        ledger.apply(store, Deposit(command_id="d2", account="bob", asset="USD", amount=1), 300)
    )
    store.flush(None)
    names = [name for name, _ in store.commands_from(None, 10)[0]]
    assert names == [("bob", "d2"), (None, "d1")]
    store.forget_command((None, "d1"))
    assert store.pending == {b"c|d1": None}  # the tombstone the changelog gets
    store.flush(None)
    assert store.command("alice", "d1") is None and store.command("bob", "d2") is not None
    # After the prune the id is free on every account again.
    fresh = ledger.apply(store, Deposit(command_id="d1", account="bob", asset="USD", amount=1), 400)
    assert fresh.result.status is Status.APPLIED


def test_a_store_an_older_engine_wrote_still_answers_its_legacy_records(tmp_path: Path) -> None:
    """Files an engine wrote before stores were marked legacy-free (here: a record in the
    old layout written straight into RocksDB, and no mark) are read with the legacy
    lookup, and stay so after a reopen."""
    old_value = msgspec.json.encode(CommandRecord("f" * 32, Status.APPLIED, None, 5))
    db = Rdict(str(tmp_path / "shard"), _options())
    db[b"c|x-1"] = old_value
    db.close()
    for _ in range(2):
        store = ShardStore(tmp_path / "shard", "cl")
        assert store.command("anyone", "x-1") is not None
        store.close()


def test_a_store_made_empty_is_marked_until_a_legacy_record_is_restored(tmp_path: Path) -> None:
    """A store this engine made empty carries the legacy-free mark across reopens; the
    first record in the old layout that recovery copies in takes the mark away, in the
    same write, and the record answers from then on, after a reopen too."""
    store = ShardStore(tmp_path / "shard", "cl")
    store.close()
    store = ShardStore(tmp_path / "shard", "cl")
    assert store.db.get(_NO_LEGACY) is not None
    old_value = msgspec.json.encode(CommandRecord("f" * 32, Status.APPLIED, None, 5))
    store.restore([(balance_key("a", "USD"), b"[1,0,1,0]"), (b"c|x-1", old_value)], 2)
    assert store.db.get(_NO_LEGACY) is None
    assert store.command("anyone", "x-1") is not None
    store.close()
    again = ShardStore(tmp_path / "shard", "cl")
    assert again.command("anyone", "x-1") is not None
    again.wipe()  # empty again: marked again
    assert again.db.get(_NO_LEGACY) is not None and again.command("anyone", "x-1") is None


def test_a_legacy_record_decodes_as_the_old_engine_wrote_it(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "shard", "cl")
    old_value = msgspec.json.encode(CommandRecord("f" * 32, Status.APPLIED, None, 5))
    store.restore([(b"c|x-1", old_value)], 1)
    record = store.command("anyone", "x-1")
    assert record is not None and (record.status, record.at_ms) == (Status.APPLIED, 5)


# Idempotency records travel as one group record per batch (issue 21) -------------------


def _deposits(store: ShardStore, ids: list[str], at_ms: int) -> None:
    for n, command_id in enumerate(ids):
        deposit = Deposit(command_id=command_id, account=f"acc{n}", asset="USD", amount=1)
        store.commit(ledger.apply(store, deposit, at_ms))


def test_a_batch_writes_its_idempotency_records_as_one_group_record(tmp_path: Path) -> None:
    """Three commands: their balances and accounts go to the changelog key by key, their
    three idempotency records as one group record; the store keeps both the records (for
    lookups) and the group (for pruning)."""
    store = _store(tmp_path)
    _deposits(store, ["d0", "d1", "d2"], 1_000)
    changes = store.changelog()
    prefixes = sorted({key[:2] for key, _ in changes})
    assert prefixes == [b"a|", b"b|", b"g|"]
    ((group, value),) = [(k, v) for k, v in changes if k.startswith(GROUP)]
    assert group.startswith(b"g|%016d|" % 1_000) and value is not None
    assert not any(key.startswith(b"c|") for key, _ in changes)
    assert len(changes) == 3 + 3 + 1
    store.flush(7)
    assert store.command("acc1", "d1") is not None
    assert store.db.get(group) == value


def test_a_big_batch_makes_several_groups_each_under_the_bound(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ids = [f"{n:04d}-" + "x" * 120 for n in range(3000)]
    _deposits(store, ids, 5)
    groups = [v for k, v in store.changelog() if k.startswith(GROUP)]
    assert len(groups) >= 2
    assert all(v is not None and len(v) <= group_bytes_max + 1024 for v in groups)
    target = ShardStore(tmp_path / "target", "cl")
    target.restore([(k, v) for k, v in store.changelog()], 1)
    assert all(target.command(f"acc{n}", i) is not None for n, i in enumerate(ids))


def test_restore_expands_a_group_and_its_deletion_takes_its_records(tmp_path: Path) -> None:
    source = _store(tmp_path)
    _deposits(source, ["d0", "d1"], 1_000)
    changelog = source.changelog()
    target = ShardStore(tmp_path / "target", "cl")
    target.restore(changelog, 10)
    record = target.command("acc0", "d0")
    assert record is not None and record.at_ms == 1_000
    assert target.command("acc1", "d1") is not None
    ((group, _),) = [(k, v) for k, v in changelog if k.startswith(GROUP)]
    target.restore([(group, None)], 11)
    assert target.command("acc0", "d0") is None and target.command("acc1", "d1") is None
    assert target.balance("acc0", "USD") is not None
    # A group written and deleted within one read of the changelog leaves nothing.
    fresh = ShardStore(tmp_path / "fresh", "cl")
    fresh.restore([*changelog, (group, None)], 12)
    assert fresh.command("acc0", "d0") is None and fresh.db.get(group) is None


def test_an_old_group_is_pruned_whole_with_one_tombstone(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _deposits(store, ["d0", "d1"], 1_000)
    store.changelog()
    store.flush(None)
    _deposits(store, ["d2"], 9_000)
    store.changelog()
    store.flush(None)
    assert store.groups_before(1_000, 10) == []  # not older than the cutoff
    ((group, members),) = store.groups_before(5_000, 10)
    assert sorted(members) == [command_key("acc0", "d0"), command_key("acc1", "d1")]
    store.forget_group(group, members)
    assert store.changelog() == [(group, None)]  # the records' deletions are local only
    store.flush(None)
    assert store.command("acc0", "d0") is None and store.command("acc1", "d1") is None
    assert store.command("acc0", "d2") is not None
    assert store.groups_before(5_000, 10) == []


def test_a_record_written_again_after_its_own_prune_is_not_its_old_group_s(
    tmp_path: Path,
) -> None:
    """A record pruned on its own (as an engine before groups did, or the per-record pass)
    and written again by a later command with the same id belongs to the later group:
    pruning or deleting the old group leaves it alone."""
    store = _store(tmp_path)
    _deposits(store, ["d0"], 1_000)
    old = store.changelog()
    store.flush(None)
    store.forget_command(("acc0", "d0"))
    store.flush(None)
    _deposits(store, ["d0"], 900_000)
    store.changelog()
    store.flush(None)
    ((group, members),) = store.groups_before(5_000, 10)
    assert members == []
    store.forget_group(group, members)
    store.flush(None)
    record = store.command("acc0", "d0")
    assert record is not None and record.at_ms == 900_000
    # The same in recovery: the old group's deletion read after the new record.
    target = ShardStore(tmp_path / "target", "cl")
    newer = msgspec.json.encode(CommandRecord("f" * 32, Status.APPLIED, None, 900_000))
    key = command_key("acc0", "d0")
    target.restore([*old, (key, None), (key, newer), (group, None)], 3)
    again = target.command("acc0", "d0")
    assert again is not None and again.at_ms == 900_000


def test_a_malformed_group_record_stops_neither_recovery_nor_pruning(tmp_path: Path) -> None:
    """A group record that is not the engine's (garbage bytes, a key without a time) is
    kept as an opaque key, like any other record: recovery goes on with the records
    around it, and pruning passes it by."""
    source = _store(tmp_path)
    _deposits(source, ["d0"], 1_000)
    good = source.changelog()
    target = ShardStore(tmp_path / "target", "cl")
    junk = [
        (b"g|0000000000000500|x", b"\xff not json"),
        (b"g|0000000000000600|y", b'[["acc9|z", {"not": "a record"}], 7]'),
        (b"g|not-a-time|z", b"[]"),
    ]
    target.restore([*junk, *good, (b"g|0000000000000500|x", None)], 5)
    assert target.command("acc0", "d0") is not None
    assert target.changelog_offset() == 5
    found = target.groups_before(10_000, 10)
    assert [key for key, _ in found][-1].startswith(b"g|%016d|" % 1_000)
    assert all(members == [] for key, members in found if not key.startswith(b"g|%016d" % 1_000))
