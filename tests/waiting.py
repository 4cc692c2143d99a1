"""Waiting, in a test, for something the system does on its own time: poll a check until
it holds, or fail with what was being waited for (and, say, a process's log tail)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def until(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    timeout_s: float,
    what: Callable[[], str] | str,
    every_s: float = 0.1,
) -> None:
    """Return once `check()` (plain or async) is true; AssertionError naming `what` (a
    text, or a function that gives it at the failure) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = check()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what() if callable(what) else what}")
        await asyncio.sleep(every_s)
