"""What every web server of ours shares: RFC 9457 problem answers, JSON answers, /livez,
and serving one aiohttp application on a host and port (the ingress, the engine
worker's table view, each sink's and the notifier's probes)."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

PROBLEM_CONTENT_TYPE = "application/problem+json"
_json = msgspec.json.Encoder()


def problem_body(
    status: int, title: str, detail: str | None = None, *, field: str | None = None, **extra: Any
) -> dict[str, Any]:
    """An RFC 9457 problem's members: `field` names what is at fault (a body field as a
    JSON path like `legs[0].to`, a header, a query or path parameter); `extra` adds
    members of its own (`failing`, `shard_id`...)."""
    out: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail is not None:
        out["detail"] = detail
    if field is not None:
        out["field"] = field
    out.update(extra)
    return out


def problem_response(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    close: bool = False,
    **extra: Any,
) -> web.Response:
    """The problem as an `application/problem+json` answer; `close`: the connection is
    closed after it (what is left of the request cannot be read as the next one)."""
    response = web.Response(
        body=_json.encode(problem_body(status, title, detail, field=field, **extra)),
        status=status,
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )
    if close:
        response.force_close()
    return response


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """`body` as JSON (msgspec: integers of any size stay exact)."""
    return web.Response(
        body=_json.encode(body), status=status, content_type="application/json", headers=headers
    )


async def livez(request: web.Request) -> web.Response:
    """Liveness: the process answers (readiness is each server's own)."""
    return json_response({"status": "ok"})


class WebServer:
    """One application served on host:port from `start()` until `stop()`. Give a runner
    instead of the application when it needs one of its own (the ingress's, which
    answers parser errors as problems); `site` goes to aiohttp's TCPSite."""

    def __init__(
        self, app: web.Application | web.AppRunner, host: str, port: int, **site: Any
    ) -> None:
        self.runner = app if isinstance(app, web.AppRunner) else web.AppRunner(app, access_log=None)
        self.host = host
        self.port = port
        self.site = site
        self._set_up = False

    async def start(self) -> None:
        self._set_up = True  # a failed setup is cleaned up too
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, **self.site).start()

    async def stop(self) -> None:
        """Stop listening and close the connections; harmless when never started."""
        if self._set_up:
            self._set_up = False
            await self.runner.cleanup()
