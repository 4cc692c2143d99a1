"""What each delivery lane has done, made durable before the lane goes on: one writer
per notifier process storing every subscription's lanes' done offsets in PostgreSQL
(`store.save_lanes_done`, migration 0006), as a group commit.

A lane that has an event acknowledged (or parked) waits in `done` until its offset is
stored. The lanes (of any subscription) that finish while one write is under way go
together in the next write, one statement for all of them: the per-acknowledgement
write costs a lane one PostgreSQL round trip and the process one statement per round,
not one per event.

The writer's connection commits asynchronously (synchronous_commit off): a write is
visible, and outlives the notifier, once PostgreSQL answers, without waiting for the
WAL flush. A crash of the notifier therefore repeats at most the one event each lane
has in flight. A crash of PostgreSQL itself can lose the last such commits (at most
3 x wal_writer_delay), but the WAL is replayed in order, so what survives is an
earlier state of the same progress: more repeats, never a skipped event. While
PostgreSQL cannot take a write the lanes wait (retried with backoff).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.05
RETRY_MAX_S = 5.0

Key = tuple[str, int, int]  # subscription id, partition, lane
Save = Callable[[dict[Key, int]], Awaitable[None]]


class LaneLog:
    def __init__(self, save: Save) -> None:
        self._save = save
        self._pending: dict[Key, int] = {}  # -> the lane's last done offset
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()

    async def done(self, key: Key, offset: int) -> None:
        """Returns once `offset` is stored as the last done offset of the lane `key`."""
        self._merge({key: offset})
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        await waiter

    async def run(self) -> None:
        """The writer: runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, waiters = self._pending, self._waiters
            self._pending, self._waiters = {}, []
            try:
                await self._store(batch)
            except asyncio.CancelledError:
                self._merge(batch)  # for `flush`: each of them is done
                raise
            for waiter in waiters:
                if not waiter.done():  # its lane may have been cancelled meanwhile
                    waiter.set_result(None)

    async def flush(self) -> None:
        """Store what is pending, once (at a shutdown, after `run` is cancelled: lanes
        stopped while waiting are then not repeated by the next notifier)."""
        if self._pending:
            batch, self._pending = self._pending, {}
            await self._save(batch)

    def _merge(self, done: dict[Key, int]) -> None:
        for key, offset in done.items():
            self._pending[key] = max(offset, self._pending.get(key, -1))

    async def _store(self, batch: dict[Key, int]) -> None:
        delay_s = RETRY_FIRST_S
        while True:
            try:
                await self._save(batch)
                return
            except Exception as exc:  # PostgreSQL away or failing: the lanes wait
                log.warning("notify: cannot store the lanes' progress (%s); retrying", exc)
                await asyncio.sleep(delay_s)
                delay_s = min(RETRY_MAX_S, delay_s * 2)
