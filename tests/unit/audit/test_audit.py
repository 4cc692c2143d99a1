"""The pure parts of `tally audit`: the sorted merge, the key order, the comparison of
one balance, conservation, the summary, and the engine's shard pages."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audit.compare import compare
from audit.merge import OutOfOrder, aligned, merge_step
from audit.report import Report, render
from audit.rows import LedgerRow, Mismatch, sort_key
from streams import ledger
from streams.store import ShardStore, balance_key
from streams.web import balance_page
from topics import limits
from topics.money import AssetFlow, conservation
from topics.schema import Deposit

accounts = st.from_regex(limits.ACCOUNT_ID_PATTERN, fullmatch=True)
assets = st.from_regex(limits.ASSET_PATTERN, fullmatch=True)


def row(
    account: str = "alice",
    asset: str = "USD",
    balance: tuple[int, int, int] | None = (10, 2, 3),
    ledger: tuple[int, int, int] | None = (10, 2, 3),
    *,
    entries: int | None = None,
    first_seq: int = 1,
    breakpoint_seq: int | None = None,
    summed: tuple[int, int] | None = None,
) -> LedgerRow:
    b = balance or (None, None, None)
    g = ledger or (None, None, None)
    n = entries if entries is not None else (g[2] if ledger else None)
    s = summed or ((g[0], g[1]) if ledger else (None, None))
    return LedgerRow(account, asset, *b, *g, n, first_seq if ledger else None,
                     breakpoint_seq, *s)  # fmt: skip


# Key order ---------------------------------------------------------------------------------


@given(st.lists(st.tuples(accounts, assets), unique=True, max_size=30))
def test_sort_key_order_is_the_engine_key_order(keys: list[tuple[str, str]]) -> None:
    by_engine = sorted(keys, key=lambda k: balance_key(*k))
    assert sorted(keys, key=lambda k: sort_key(*k)) == by_engine


def test_sort_key_is_not_the_account_then_asset_order() -> None:
    # '|' sorts after every id character: the longer account comes first.
    assert sort_key("ab", "X") > sort_key("abc", "X")
    assert balance_key("ab", "X") > balance_key("abc", "X")


def test_the_engine_pages_a_shard_in_key_order_and_only_what_is_committed(
    tmp_path: Path,
) -> None:
    store = ShardStore(tmp_path / "shard-0", "app-state-changelog")
    keys = [("abc", "X"), ("ab", "X"), ("ab", "Y"), ("a", "USD"), ("b", "EUR")]
    for i, (account, asset) in enumerate(keys):
        deposit = Deposit(command_id=f"d{i}", account=account, asset=asset, amount=i + 1)
        store.commit(ledger.apply(store, deposit, 1))
    store.flush(None)
    store.commit(ledger.apply(store, Deposit(command_id="x", account="c", asset="X", amount=1), 1))
    pages, after = [], None
    while True:
        rows, cursor = balance_page(store, after, 2)
        pages.append([(r.account, r.asset, r.available, r.seq) for r in rows])
        if cursor is None:
            break
        account, _, asset = cursor.partition("/")
        after = (account, asset)
    assert [len(p) for p in pages] == [2, 2, 1]
    listed = [row for page in pages for row in page]
    assert [(a, s) for a, s, _, _ in listed] == sorted(keys, key=lambda k: sort_key(*k))
    assert all(seq == 1 for _, _, _, seq in listed)  # "c" is staged, not committed
    store.close()


# The merge ---------------------------------------------------------------------------------


def test_merge_step_stops_at_the_smaller_last_key() -> None:
    out, left, right = merge_step([("a", 1), ("c", 3), ("e", 5)], [("b", 20), ("c", 30)],
                                  False, False)  # fmt: skip
    assert out == [("a", 1, None), ("b", None, 20), ("c", 3, 30)]
    assert left == [("e", 5)] and right == []


def test_merge_step_waits_for_a_stream_with_an_empty_buffer() -> None:
    out, left, right = merge_step([("a", 1)], [], False, False)
    assert out == [] and left == [("a", 1)] and right == []


def test_merge_step_flushes_once_the_other_stream_is_done() -> None:
    out, left, right = merge_step([("a", 1), ("z", 2)], [], False, True)
    assert out == [("a", 1, None), ("z", 2, None)] and left == right == []


async def _pages(
    keys: list[str], cuts: list[int], tag: str
) -> AsyncIterator[list[tuple[str, str]]]:
    start = 0
    for cut in [*sorted(set(c % (len(keys) + 1) for c in cuts)), len(keys)]:
        if cut >= start:
            yield [(k, f"{tag}{k}") for k in keys[start:cut]]  # empty pages too
            start = cut


@given(
    st.sets(st.text("abc|", min_size=1, max_size=4), max_size=40),
    st.sets(st.text("abc|", min_size=1, max_size=4), max_size=40),
    st.lists(st.integers(0, 50), max_size=8),
    st.lists(st.integers(0, 50), max_size=8),
)
async def test_aligned_yields_every_key_once_in_order_with_both_sides(
    left: set[str], right: set[str], left_cuts: list[int], right_cuts: list[int]
) -> None:
    merged = [
        item
        async for page in aligned(
            _pages(sorted(left), left_cuts, "L"), _pages(sorted(right), right_cuts, "R")
        )
        for item in page
    ]
    assert [k for k, _, _ in merged] == sorted(left | right)
    for key, lv, rv in merged:
        assert lv == (f"L{key}" if key in left else None)
        assert rv == (f"R{key}" if key in right else None)


async def test_aligned_refuses_a_stream_out_of_order() -> None:
    async def bad() -> AsyncIterator[list[tuple[str, int]]]:
        yield [("b", 1)]
        yield [("a", 2)]

    async def nothing() -> AsyncIterator[list[tuple[str, int]]]:
        return
        yield

    with pytest.raises(OutOfOrder) as caught:
        async for _ in aligned(bad(), nothing()):
            pass
    assert caught.value.side == "left"


# One balance ----------------------------------------------------------------------------------


def test_agreeing_stores_are_no_mismatch() -> None:
    assert compare(0, "alice|USD", row(), (10, 2, 3), (10, 2, 3)) == []


def test_each_store_is_compared_with_the_ledger_and_named() -> None:
    found = compare(3, "alice|USD", row(balance=(11, 2, 3)), (10, 2, 3), None)
    assert [(m.kind, m.account, m.asset, m.seq) for m in found] == [
        ("postgres", "alice", "USD", 3),
        ("redis", "alice", "USD", 3),
    ]
    assert found[0].line() == (
        "postgres   alice/USD seq 3 (shard 3): expected (ledger) available 10, held 2, seq 3;"
        " found (PostgreSQL balances) available 11, held 2, seq 3"
    )
    assert found[1].found == "(Redis) no balance"


def test_skipped_stores_are_not_compared() -> None:
    assert compare(0, "alice|USD", row(), None, None, with_engine=False, with_redis=False) == []


def test_a_balance_without_ledger_entries_carries_the_store_seq() -> None:
    found = compare(1, "bob|EUR", None, (5, 0, 9), None)
    assert [(m.kind, m.seq, m.expected) for m in found] == [
        ("engine", 9, "(ledger) no balance (no ledger entries)")
    ]


def test_a_seq_gap_and_a_wrong_breakpoint_are_the_ledgers_own_mismatches() -> None:
    gap = row(entries=4, first_seq=2, ledger=(10, 2, 5), balance=(10, 2, 5))
    assert [m.kind for m in compare(0, "a|USD", gap, (10, 2, 5), (10, 2, 5))] == ["seq_gap"]
    broken = row(breakpoint_seq=2, summed=(9, 2))
    found = compare(0, "a|USD", broken, (10, 2, 3), (10, 2, 3))
    assert [m.kind for m in found] == ["breakpoint"]
    assert "breakpoint at seq 2 + later entries" in found[0].found


def test_an_asset_missing_from_the_redis_asset_set_is_a_redis_mismatch() -> None:
    found = compare(0, "a|USD", row(), (10, 2, 3), (10, 2, 3), redis_listed=False)
    assert [(m.kind, m.found) for m in found] == [("redis", "not listed")]


def test_unreadable_redis_fields_show_as_question_marks() -> None:
    found = compare(0, "a|USD", row(), (10, 2, 3), (None, 2, 3))
    assert found[0].found == "(Redis) available ?, held 2, seq 3"


# Conservation and the summary ------------------------------------------------------------------


def test_conservation_needs_external_flows_to_match_and_internal_moves_to_net_zero() -> None:
    flows = {("USD", "deposit"): 100, ("USD", "withdraw"): -30, ("USD", "capture"): -20,
             ("USD", "internal"): 0, ("EUR", "deposit"): 5, ("EUR", "internal"): 3}  # fmt: skip
    usd, eur = sorted(conservation({"USD": 50, "EUR": 8}, flows), key=lambda f: f.asset != "USD")
    assert usd.ok and usd.external == 50
    assert usd.line() == (
        "USD: balances 50 = deposits 100 - withdrawals 30 - captured out 20; between accounts net 0"
    )
    # A credit whose debit is missing: the balances match the ledger, but money appeared.
    assert not eur.ok and "balances 8 != deposits 5" in eur.line()


def _report(mismatches: Counter[str], first: list[Mismatch]) -> Report:
    return Report(
        schema="t", shards=2, sources=["postgres", "redis"], skipped=["engine"], balances=4,
        compared=Counter(ledger=4, postgres=4, redis=3), mismatches=mismatches, first=first,
        flows=[AssetFlow("USD", 10, deposits=10)], seconds=0.5,
    )  # fmt: skip


def test_render_says_everything_agrees_or_counts_and_lists_mismatches() -> None:
    clean = render(_report(Counter(), []))
    assert "engine tables" in clean and "skipped" in clean
    assert clean.endswith("result: everything agrees")
    bad = compare(1, "a|USD", row(), (10, 2, 3), None)
    text = render(_report(Counter(redis=1), bad))
    assert "mismatches: 1 (redis 1)" in text
    assert "  redis      a/USD seq 3 (shard 1): expected (ledger)" in text
    assert text.endswith("result: 1 mismatch")


def test_a_query_postgresql_refused_is_not_reported_as_postgresql_down() -> None:
    """An audit failure names its real cause: a refused query (here the old 64-bit cast's
    "bigint out of range") says PostgreSQL is up and gives the SQLSTATE."""
    import asyncpg

    from audit.postgres import _failed

    refused = _failed(asyncpg.exceptions.NumericValueOutOfRangeError("bigint out of range"))
    assert "query failed (PostgreSQL is up)" in str(refused) and "22003" in str(refused)
    down = _failed(ConnectionRefusedError("connection refused"))
    assert str(down) == "PostgreSQL: connection refused"
