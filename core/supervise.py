"""Run one command as several child processes and start again any that dies, until
SIGTERM/SIGINT. Used by `tally sink --processes N` and `tally ingress --processes N`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

log = logging.getLogger(__name__)


async def supervise(label: str, commands: list[list[str]], restart_delay_s: float = 1.0) -> None:
    """Start every command; restart one that exits; on a signal, stop them all."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    children: dict[int, asyncio.subprocess.Process] = {}

    async def start(k: int) -> None:
        children[k] = await asyncio.create_subprocess_exec(*commands[k])

    for k in range(len(commands)):
        await start(k)
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), 0.5)
        for k, child in list(children.items()):
            if child.returncode is not None and not stopping.is_set():
                log.warning("%s: process %d exited %s; starting it again", label, k,
                            child.returncode)  # fmt: skip
                await asyncio.sleep(restart_delay_s)
                await start(k)
    for child in children.values():
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
    await asyncio.gather(*(child.wait() for child in children.values()))
