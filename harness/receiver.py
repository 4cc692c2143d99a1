"""A subscriber's endpoint on loopback, as a customer would run one: it checks every
delivery's signature, answers 200, and keeps the delivery ids (a receiver deduplicates by
them: delivery is at-least-once). The demo subscribes one to the results it pushes."""

from __future__ import annotations

import time

from aiohttp import web

from harness.procs import free_port
from notify import rules as notify_rules


class Receiver:
    """A subscriber's endpoint: checks each delivery's signature, answers 200, and keeps
    the delivery ids (a receiver deduplicates by them: delivery is at-least-once)."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.delivered: dict[str, str] = {}  # delivery id -> command_id
        self.repeats = 0
        self.bad_signatures = 0
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        if not notify_rules.verify(self.secret, headers, body, now_s=int(time.time())):
            self.bad_signatures += 1
            return web.Response(status=401)
        delivery = headers[notify_rules.DELIVERY_ID]
        if delivery in self.delivered:
            self.repeats += 1
        self.delivered[delivery] = headers[notify_rules.COMMAND_ID]
        return web.Response(status=200)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
