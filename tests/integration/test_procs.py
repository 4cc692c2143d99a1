"""The harness's child processes: `IngressProcess.wait_ready` with several processes
waits for each of this start's processes to listen, not for lines an earlier start of
the same log left behind."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aiohttp import web

from core.settings import Settings
from harness.procs import IngressProcess, free_port

LISTENING = "ingress: listening on http://127.0.0.1:1\n"


class _StandIn(IngressProcess):
    """A process that stays alive and logs nothing, with a loopback server answering its
    /readyz: the test writes the "listening" lines itself, one process at a time."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(120)"]


async def _readyz(_: web.Request) -> web.Response:
    return web.json_response({"ready": True})


async def test_wait_ready_ignores_listening_lines_of_an_earlier_start(
    settings: Settings, tmp_path: Path, unique: str
) -> None:
    app = web.Application()
    app.router.add_get("/readyz", _readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    log = tmp_path / "ingress.log"
    log.write_text(LISTENING * 2)  # an earlier start of two processes, same log
    ingress = _StandIn(settings, prefix=f"procs-{unique}", log_path=log, processes=2, port=port)
    await ingress.start(wait=False)
    try:
        ready = asyncio.create_task(ingress.wait_ready())
        await asyncio.sleep(1.5)
        assert not ready.done(), "ready although no process of this start listens"
        with log.open("a") as f:
            f.write(LISTENING)
        await asyncio.sleep(1.5)
        assert not ready.done(), "ready although one of two processes listens"
        with log.open("a") as f:
            f.write(LISTENING)
        await asyncio.wait_for(ready, 30)
    finally:
        await ingress.stop()
        await runner.cleanup()
