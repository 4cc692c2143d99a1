"""The end-of-run checks of the guarantees, over what the engine published and what it holds.

Shared by the demo, the benchmark and the integration tests, so that all three judge a run
by the same rules: one result per record, dead letters only for garbage, `seq` without
gaps or repeats, published balances equal to the engine's tables, and conservation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from harness.collector import Results
from streams.state import BalanceState
from topics.money import conservation, flows_of, holdings


@dataclass(frozen=True)
class Check:
    """One guarantee judged: its name, whether it held, and the numbers that say so
    (the demo's, the tests' and the chaos harness's checks all return these)."""

    name: str
    ok: bool
    detail: str


def run_checks(
    *,
    expected: Mapping[str, int],
    garbage: int,
    results: Results,
    balances: Mapping[tuple[str, str], BalanceState],
) -> list[Check]:
    """Judge a drained run. `expected` maps each client command id to its record count."""
    return [
        _one_result_per_record(expected, results),
        _nothing_in_flight(results),
        _dead_letters(garbage, results),
        _seq_and_tables(results, balances),
        _conservation(results, balances),
    ]


def _one_result_per_record(expected: Mapping[str, int], results: Results) -> Check:
    wrong = [
        (cid, n, len(results.by_id.get(cid, ())))
        for cid, n in expected.items()
        if len(results.by_id.get(cid, ())) != n
    ]
    detail = f"{sum(expected.values())} records, {len(wrong)} with a wrong result count"
    if wrong:
        detail += f" (first: {wrong[0][0]} expected {wrong[0][1]}, got {wrong[0][2]})"
    return Check("exactly one result per record", not wrong, detail)


def _nothing_in_flight(results: Results) -> Check:
    pending = results.pending_internal()
    internal = sum(1 for cid in results.by_id if "/" in cid or cid.startswith("expire."))
    detail = f"{internal} internal commands answered, {len(pending)} missing"
    return Check("every credit and refund applied", not pending, detail)


def _dead_letters(garbage: int, results: Results) -> Check:
    got = len(results.dead_letters)
    return Check("dead letters are exactly the garbage", got == garbage, f"{got} of {garbage}")


def _seq_and_tables(results: Results, balances: Mapping[tuple[str, str], BalanceState]) -> Check:
    seqs: dict[tuple[str, str], list[int]] = defaultdict(list)
    last: dict[tuple[str, str], tuple[int, int, int]] = {}
    for group in results.by_id.values():
        for r in group:
            for e in r.entries:
                key = (e.account, e.asset)
                seqs[key].append(e.seq)
                if e.seq >= last.get(key, (0, 0, 0))[0]:
                    last[key] = (e.seq, e.available, e.held)
    gaps = [k for k, s in seqs.items() if sorted(s) != list(range(1, len(s) + 1))]
    differ = [
        k
        for k, (seq, available, held) in last.items()
        if (b := balances.get(k)) is None or (b.seq, b.available, b.held) != (seq, available, held)
    ]
    ok = not gaps and not differ
    detail = (
        f"{len(seqs)} balances, {sum(len(s) for s in seqs.values())} entries; "
        f"{len(gaps)} with gaps or repeats, {len(differ)} differing from the tables"
    )
    if gaps:
        detail += f" (first gap: {gaps[0]})"
    if differ:
        detail += f" (first differing: {differ[0]})"
    return Check("seq has no gaps; events match tables", ok, detail)


def _conservation(results: Results, balances: Mapping[tuple[str, str], BalanceState]) -> Check:
    """Per asset (topics.money): the tables' balances add up to deposits - withdrawals -
    captures to no account, and every other movement nets to zero."""
    every = (r for group in results.by_id.values() for r in group)
    held = holdings((asset, b.available, b.held) for (_, asset), b in balances.items())
    assets = conservation(held, flows_of(every))
    detail = ", ".join(
        f"{f.asset}: balances {f.balances} vs flows {f.external}, internal net {f.internal}"
        for f in assets
    )
    return Check("conservation per asset", all(f.ok for f in assets), detail)


def render(checks: list[Check]) -> str:
    lines = [f"  [{'ok' if c.ok else 'FAIL':>4}] {c.name}: {c.detail}" for c in checks]
    return "\n".join(lines)
