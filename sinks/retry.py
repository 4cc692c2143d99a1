"""Waiting out a store that is down: the same call again, with exponential backoff and
full jitter, until the store answers; the outage is logged once when it starts and once
when it ends, not once per retry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from sinks.batch import Store

log = logging.getLogger("sinks.runner")  # the sink's own lines, under one name

backoff_first_s = 0.1
backoff_max_s = 5.0


class Outages:
    """A store's outages: whether it is down now (since when) and how many there were."""

    def __init__(self, stopping: asyncio.Event) -> None:
        self.stopping = stopping  # once set, an outage is given up instead of waited out
        self.down_since: float | None = None
        self.count = 0

    async def retrying(self, store: Store, call: Callable[[], Any]) -> Any:
        """Run `call` until `store` answers; reopen the store between tries. (The store
        is the caller's current one: a runner's store may be replaced before it runs.)"""
        delay = backoff_first_s
        while True:
            try:
                result = await call()
            except store.unavailable as exc:
                self._down(store, exc)
                if self.stopping.is_set():
                    raise
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(backoff_max_s, delay * 2)
                with contextlib.suppress(*store.unavailable):
                    await store.close()
                    await store.open()
                continue
            self._up(store)
            return result

    def _down(self, store: Store, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.count += 1
            log.warning("sink %s: store unavailable (%s); retrying", store.name, exc)

    def _up(self, store: Store) -> None:
        if self.down_since is not None:
            log.warning(
                "sink %s: store back after %.1fs",
                store.name,
                time.monotonic() - self.down_since,
            )
            self.down_since = None
