"""ShardStore: a batch reads its own staged writes, nothing reaches RocksDB before flush,
flush stores the data and the changelog offset together, and recovery is a plain copy."""

from __future__ import annotations

from pathlib import Path

from streams import ledger
from streams.store import ShardStore, balance_key, command_key
from topics.schema import Deposit, Hold, Release


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
    assert again.command("d1") is not None and again.changelog_offset() == 42


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
    assert store.command("d2") is None
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
    target.restore([(command_key("d1"), None)], 18)
    assert target.command("d1") is None


def test_commands_are_paged_for_pruning(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for i in range(5):
        cmd = Deposit(command_id=f"c{i}", account="a", asset="USD", amount=1)
        store.commit(ledger.apply(store, cmd, 100 + i))
    store.flush(None)
    first, cursor = store.commands_from(None, 3)
    assert [cid for cid, _ in first] == ["c0", "c1", "c2"] and cursor is not None
    rest, cursor = store.commands_from(cursor, 3)
    assert [cid for cid, _ in rest] == ["c3", "c4"] and cursor is None
    assert [rec.at_ms for _, rec in first + rest] == [100, 101, 102, 103, 104]
    store.forget_command("c0")
    store.flush(None)
    assert store.command("c0") is None and store.command("c1") is not None
