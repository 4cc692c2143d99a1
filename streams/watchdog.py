"""Notice a partition that stopped making progress while it has work: records have
waited behind it (lag > 0) for `stall_after_s` and its committed offset has not moved
in that time. The clock starts at the later of the partition's last move and the moment
records started waiting: after a quiet spell (nothing to do, so nothing moves) a burst
is not a stall until it has waited `stall_after_s` unapplied.

The failure this is for is the quiet one: a consumer that is still in its group, still
heartbeating, whose partition is assigned to it, and that applies nothing (a loop stuck
on a transaction that never completes, a fetch that never comes back). Nothing crashes,
so nothing restarts it; only the numbers show it. The engine reports every batch it
commits (`advanced`) and what the consumer knows of each partition's end (`seen`); the
watchdog keeps the time each partition last moved and since when records wait on it,
and its state is read when metrics
are scraped, so a stalled loop cannot hide its own stall. Pure: no Kafka, a clock passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

stall_after_s = 30.0


@dataclass
class PartitionProgress:
    committed: int | None = None  # the next offset to apply, after the last commit
    end: int | None = None  # the partition's high watermark, as last fetched
    moved_at: float = 0.0  # when `committed` last changed (or the partition was taken)
    waiting_since: float | None = None  # since when lag > 0 without a break (None: 0)

    @property
    def lag(self) -> int:
        if self.end is None or self.committed is None:
            return 0
        return max(0, self.end - self.committed)


class Watchdog:
    def __init__(self, *, stall_after_s: float = stall_after_s) -> None:
        self.stall_after_s = stall_after_s
        self.partitions: dict[tuple[str, int], PartitionProgress] = {}
        self._warned: set[tuple[str, int]] = set()

    def assigned(self, keys: Iterable[tuple[str, int]], now: float) -> None:
        """The partitions this worker serves from now on (others are forgotten)."""
        keep = set(keys)
        for key in list(self.partitions):
            if key not in keep:
                del self.partitions[key]
                self._warned.discard(key)
        for key in keep:
            self.partitions.setdefault(key, PartitionProgress(moved_at=now))

    def advanced(self, key: tuple[str, int], committed: int, now: float) -> None:
        progress = self.partitions.get(key)
        if progress is None:
            return
        if progress.committed != committed:
            progress.committed = committed
            progress.moved_at = now
            self._warned.discard(key)
        _waiting(progress, now)

    def seen(
        self, key: tuple[str, int], end: int | None, committed: int | None, *, now: float
    ) -> None:
        """The partition's end as the consumer last fetched it; `committed` fills in the
        starting point of a partition that has not committed anything here yet."""
        progress = self.partitions.get(key)
        if progress is None:
            return
        if end is not None:
            progress.end = end
        if progress.committed is None and committed is not None:
            progress.committed = committed
        _waiting(progress, now)

    def stalled_for(self, key: tuple[str, int], now: float) -> float:
        """Seconds the partition has waited with lag and no progress (0 if it has none)."""
        progress = self.partitions[key]
        if progress.lag == 0 or progress.waiting_since is None:
            return 0.0
        return max(0.0, now - max(progress.moved_at, progress.waiting_since))

    def stalled(self, now: float) -> list[tuple[str, int]]:
        return sorted(k for k in self.partitions if self.stalled_for(k, now) >= self.stall_after_s)

    def newly_stalled(self, now: float) -> list[tuple[str, int]]:
        """Stalled partitions not reported yet (each is reported once per stall)."""
        fresh = [k for k in self.stalled(now) if k not in self._warned]
        self._warned.update(fresh)
        return fresh


def _waiting(progress: PartitionProgress, now: float) -> None:
    """Start the waiting clock when records start to wait; stop it when none do."""
    if progress.lag == 0:
        progress.waiting_since = None
    elif progress.waiting_since is None:
        progress.waiting_since = now
