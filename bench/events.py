"""Synthetic result events for the benchmarks that consume the events topic (sinks,
replay, notify): produced straight to the topic, no engine needed."""

from __future__ import annotations

from topics.codec import encode
from topics.schema import Entry, Result, Status


def result_events(count: int, accounts: int, now_ms: int) -> list[tuple[str, bytes]]:
    """`count` applied deposits of 10 as (account, encoded result event), one balance
    entry each, over `accounts` accounts (`bench-<n>`, round robin) with seq 1, 2, 3...
    per account: what the sinks, replay and notify benchmarks feed their consumer."""
    seqs = [0] * accounts
    out = []
    for i in range(count):
        a = i % accounts
        seqs[a] += 1
        account = f"bench-{a}"
        entry = Entry(
            account=account, asset="USD", seq=seqs[a], available=seqs[a] * 10, held=0,
            delta_available=10, delta_held=0,
        )  # fmt: skip
        result = Result(
            command_id=f"b-{i}", account=account, kind="deposit", status=Status.APPLIED,
            entries=[entry], at_ms=now_ms,
        )  # fmt: skip
        out.append((account, encode(result)))
    return out
