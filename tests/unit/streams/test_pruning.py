"""Idempotency pruning's pass (`streams.timers.Pruning`): it finds every old record of
every owned shard, and its work per poll and per pass does not grow with the number of
shards (a pass over 64 shards in one poll held that poll about a second)."""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st

from streams import timers
from streams.state import CommandRecord
from streams.store import ShardStore
from streams.timers import Pruning
from topics.schema import Status

RETENTION_MS = 1000


class _Store:
    """The two reads pruning makes of a shard's store, over sorted records, counting
    how many it is asked for."""

    def __init__(self, ages: list[int]) -> None:
        self.records = [
            ((f"a{i:05d}", f"c{i}"), CommandRecord("f", Status.APPLIED, None, at))
            for i, at in enumerate(ages)
        ]
        self.read = 0

    def groups_before(self, cutoff_ms: int, limit: int) -> list[Any]:
        return []

    def commands_from(self, start: bytes | None, limit: int) -> tuple[list[Any], bytes | None]:
        i = int(start or b"0")
        out = self.records[i : i + limit]
        self.read += len(out)
        end = i + len(out)
        return out, (str(end).encode() if end < len(self.records) else None)


def _polls(pruning: Pruning, stores: dict[int, _Store], now: float) -> list[dict[int, Any]]:
    """Poll until the pass started at `now` is over; what each poll found."""
    found = []
    owned = set(stores)
    as_stores = cast(dict[int, ShardStore], stores)
    while True:
        before = sum(s.read for s in stores.values())
        found.append(pruning.due(now, 10_000, owned, as_stores))
        assert sum(s.read for s in stores.values()) - before <= timers.prune_scan_per_poll
        if not pruning._pass:
            return found


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 80), st.lists(st.integers(0, 20_000), max_size=400))
def test_a_pass_finds_every_old_record_and_reads_a_bounded_amount(
    shards: int, ages: list[int]
) -> None:
    stores = {p: _Store(ages) for p in range(shards)}
    pruning = Pruning(RETENTION_MS, Counter(), lambda now: True)
    polls = _polls(pruning, stores, now=100.0)
    read = sum(s.read for s in stores.values())
    assert read <= max(timers.prune_scan_per_pass, shards * timers.prune_slice_min)
    if len(ages) <= timers.prune_slice_min:  # every slice holds the whole shard
        old = sorted(n for n, rec in stores[0].records if rec.at_ms < 10_000 - RETENTION_MS)
        for p in range(shards):
            named = sorted(n for found in polls for n in (found[p].names if p in found else []))
            assert named == old
    # Until prune_every_s has passed, the next poll starts no new pass.
    assert pruning.due(100.2, 10_000, set(stores), cast(dict[int, ShardStore], stores)) == {}


def test_a_big_store_is_read_a_slice_per_pass_and_on_from_there_next_pass() -> None:
    stores = {0: _Store([0] * 100_000)}
    pruning = Pruning(RETENTION_MS, Counter(), lambda now: True)
    first = _polls(pruning, stores, now=100.0)
    assert stores[0].read == timers.prune_scan_per_pass
    assert sum(len(f[0].names) for f in first) == timers.prune_scan_per_pass
    later = _polls(pruning, stores, now=100.0 + timers.prune_every_s)
    assert stores[0].read == 2 * timers.prune_scan_per_pass
    names = [n for f in first + later for n in f[0].names]
    assert len(set(names)) == len(names)  # the second pass went on, not back
