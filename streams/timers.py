"""The engine's timers: hold expiry and idempotency pruning. Each poll asks them what is
due; what they return joins the shard's next batch and commits in its transaction, like
any record (see `streams.loop`).

Both judge time by the engine's own clock (see `streams.engine`), never a record's.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from streams.records import Expiring
from streams.store import CommandName, ShardStore, command_key
from topics.schema import Expire
from topics.shard import shard_of

# How often the owned shards are scanned for open holds with an expiry (finding those of
# shards taken over from another worker), and old idempotency records looked for.
expiry_rescan_s = 30.0
prune_every_s = 10.0
# A pass reads a slice of each owned shard's idempotency records kept one by one: in all
# prune_scan_per_pass records (at least prune_slice_min a shard), at most
# prune_scan_per_poll of them in one poll. So pruning's work per pass and per poll does
# not grow with the shard count: reading 5,000 records of each of 64 shards in one poll
# held that poll ~1 s (py-spy, `tally bench engine` at 64 partitions: 7.6% of the
# worker in Pruning.due). (Most records belong to a group and go with it; the slices
# find the records written before groups, or kept one by one.)
prune_scan_per_pass = 40_000
prune_slice_min = 200
prune_scan_per_poll = 2000
# Groups hold a batch's idempotency records each (up to poll_max_records).
prune_groups_per_shard = 200


class HoldExpiries:
    """The open holds with an expiry, soonest first, and the Expire commands due."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self._heap: list[Expiring] = []
        self._known: set[Expiring] = set()
        self._next_rescan = 0.0

    def watch(self, item: Expiring) -> None:
        if item not in self._known:
            self._known.add(item)
            heapq.heappush(self._heap, item)

    def rescan_soon(self) -> None:
        """Scan the owned shards' open holds at the next poll (after a take-over, or after
        a batch whose expiries did not commit)."""
        self._next_rescan = 0.0

    def due(
        self, now: float, now_ms: int, owned: set[int], stores: Mapping[int, ShardStore]
    ) -> dict[int, list[Expire]]:
        """Expire commands for the open holds whose time has passed, by shard. An expiry
        is applied by the shard that owns the hold, in its next batch, with its own result.
        `now` is monotonic (when to rescan), `now_ms` the engine's time."""
        if now >= self._next_rescan:
            # Holds of shards taken over from another worker are found by this scan.
            self._next_rescan = now + expiry_rescan_s
            for p in owned:
                for account, hold_id, held in stores[p].open_holds():
                    if held.expires_at_ms is not None:
                        self.watch((held.expires_at_ms, account, hold_id))
        due: dict[int, list[Expire]] = {}
        while self._heap and self._heap[0][0] <= now_ms:
            item = heapq.heappop(self._heap)
            # Forgotten at once: if the batch that applies it aborts, the next rescan
            # finds the hold again.
            self._known.discard(item)
            expires, account, hold_id = item
            p = shard_of(account, self.partitions)
            open_hold = stores[p].hold(account, hold_id) if p in owned else None
            if open_hold is None or open_hold.expires_at_ms != expires:
                # Released, captured, or not this worker's shard (any more).
                continue
            digest = hashlib.blake2b(
                f"{account}|{hold_id}|{expires}".encode(), digest_size=16
            ).hexdigest()
            due.setdefault(p, []).append(
                Expire(command_id=f"expire.{digest}", account=account, hold_id=hold_id)
            )
        return due


@dataclass
class Prune:
    """What one shard's next batch forgets: group records with the idempotency records
    they hold, and idempotency records kept on their own (written before groups, or
    legacy ones)."""

    groups: list[tuple[bytes, list[bytes]]] = field(default_factory=list)
    names: list[CommandName] = field(default_factory=list)

    def apply(self, store: ShardStore) -> None:
        for key, members in self.groups:
            store.forget_group(key, members)
        for name in self.names:
            store.forget_command(name)


class Pruning:
    """Idempotency records older than the retention, found a bounded slice at a time: a
    pass over the owned shards every `prune_every_s`, spread over as many polls as its
    reading budget needs (`prune_scan_per_poll`)."""

    def __init__(
        self, retention_ms: int, counts: Counter[str], clock_agrees: Callable[[float], bool]
    ) -> None:
        self.retention_ms = retention_ms
        self.counts = counts
        # Pruning waits while the engine's clock is not known to agree with the broker's
        # (see `streams.engine`): a clock ahead would forget other workers' records early.
        self.clock_agrees = clock_agrees
        self._next_prune = 0.0
        # The shards this pass has still to visit, in order; each one's slice, and how
        # much of the first one's slice is read.
        self._pass: list[int] = []
        self._slice = prune_slice_min
        self._read = 0
        self._cursor: dict[int, bytes | None] = {}

    def due(
        self, now: float, now_ms: int, owned: set[int], stores: Mapping[int, ShardStore]
    ) -> dict[int, Prune]:
        """Idempotency records older than the retention in the next shards of the pass:
        the oldest groups first, then a slice of the records kept one by one (those of
        the groups found here are not named twice)."""
        if self.retention_ms <= 0 or not self.clock_agrees(now):
            return {}
        if not self._pass:
            if now < self._next_prune:
                return {}
            # Short retentions (tests) are pruned sooner than every prune_every_s.
            self._next_prune = now + min(prune_every_s, max(0.5, self.retention_ms / 4000))
            self._pass = sorted(owned)
            self._slice = max(prune_slice_min, prune_scan_per_pass // max(1, len(owned)))
            self._read = 0
        # The records' times are the engine's own: no producer moves them.
        cutoff = now_ms - self.retention_ms
        due: dict[int, Prune] = {}
        budget = prune_scan_per_poll
        while self._pass and budget > 0:
            p = self._pass[0]
            if p not in owned:  # given up since the pass began
                self._pass.pop(0)
                self._read = 0
                continue
            store = stores[p]
            groups = store.groups_before(cutoff, prune_groups_per_shard) if not self._read else []
            grouped = {member for _, members in groups for member in members}
            want = min(budget, self._slice - self._read)
            records, cursor = store.commands_from(self._cursor.get(p), want)
            self._cursor[p] = cursor
            budget -= len(records)
            self._read += len(records)
            if cursor is None or self._read >= self._slice:
                self._pass.pop(0)  # this shard's slice is read (or its records' end)
                self._read = 0
            old = [
                name
                for name, rec in records
                if rec.at_ms < cutoff
                and (name[0] is None or command_key(name[0], name[1]) not in grouped)
            ]
            if groups or old:
                mine = due.setdefault(p, Prune())
                mine.groups.extend(groups)
                mine.names.extend(old)
                self.counts["pruned"] += len(grouped) + len(old)
        return due
