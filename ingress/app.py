"""The ingress: signed HTTP requests in, commands on Kafka out; balances and results out.
This module wires the parts together and runs their life cycle; each part says what it
checks or does.

Order of checks on a request, so that each answer is the most useful one and nothing
is produced unless everything before it passed:
  what aiohttp's parser refuses (400/414/431, see ingress.protocol) -> size (413)
  -> repeated headers (400) -> body read in time (408) -> signature (401)
  -> rate limit (429) -> first use of the signature (401, or 503 when Redis cannot tell)
  (ingress.admission) -> content type (415) -> body and headers (400/422)
  -> produce (202 after the broker's ack, or 503) (ingress.submit, which says what a
  202 and a 503 promise).
A client that goes away while sending its body is counted, not answered (ingress.metrics).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.exposition import generate_latest

from core.http import json_response, livez
from core.settings import Settings, SettingsError
from ingress import subscriptions
from ingress.admission import Admission
from ingress.connections import Connections
from ingress.engine_view import EngineView
from ingress.metrics import Metrics, middleware
from ingress.openapi import document
from ingress.problems import Problem
from ingress.read_routes import Reads
from ingress.submit import Submit
from topics.names import deployment_topics

log = logging.getLogger(__name__)

# A readiness probe waits this long for each dependency.
check_timeout_s = 2.0


class Ingress:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.check(settings)
        self.metrics = Metrics()
        self.connections = Connections(settings)
        self.admission = Admission(settings, self.connections)
        self.submit = Submit(settings, self.connections, self.admission, self.metrics)
        engine = EngineView(settings, self.connections)
        self.reads = Reads(settings, self.connections, self.admission, engine)
        self.document = document()
        self.app = web.Application(
            middlewares=[middleware(self.metrics)], client_max_size=settings.ingress_body_max_bytes
        )
        self._add_routes(self.app.router)
        self.app.on_startup.append(self._open)
        self.app.on_cleanup.append(self._close)

    def _add_routes(self, routes: web.UrlDispatcher) -> None:
        reads = self.reads
        routes.add_post("/v1/commands", self.submit.post_command)
        routes.add_post("/v1/commands/batch", self.submit.post_batch)
        routes.add_get("/v1/commands/{command_id}", reads.get_command, allow_head=False)
        routes.add_get("/v1/accounts/{account}/balances", reads.get_balances, allow_head=False)
        subscriptions.add_routes(
            routes,
            self.admission.admit,
            lambda: self.connections.pg,
            allow_private=self.settings.notify_allow_private,
        )
        routes.add_get("/v1/commands", reads.get_commands, allow_head=False)
        routes.add_get("/v1/accounts/{account}", reads.get_account, allow_head=False)
        routes.add_get("/v1/accounts/{account}/entries", reads.get_entries, allow_head=False)
        routes.add_get("/livez", livez, allow_head=False)
        routes.add_get("/readyz", self.readyz, allow_head=False)
        routes.add_get("/metrics", self.get_metrics, allow_head=False)
        routes.add_get("/openapi.json", self.get_openapi, allow_head=False)

    @staticmethod
    def check(settings: Settings) -> None:
        """Refuse to start without a way to authenticate clients."""
        if not settings.client_keys() and not settings.ingress_insecure:
            raise SettingsError(
                "TALLY_INGRESS_KEYS is empty: configure client keys, or set "
                "TALLY_INGRESS_INSECURE=1 to accept unsigned requests (never in production)"
            )

    async def _open(self, _: web.Application) -> None:
        if self.settings.ingress_insecure:
            log.warning(
                "TALLY_INGRESS_INSECURE is set: requests are NOT signature-checked, anyone "
                "who reaches this port can move money. Never run this way in production."
            )
        await self.connections.open()
        keys = self.admission.keys
        log.info(
            "ingress: producing to %s; %d client keys (%s)",
            deployment_topics(self.settings).commands.name,
            len(keys),
            ", ".join(sorted(keys)),
        )

    async def _close(self, _: web.Application) -> None:
        await self.connections.close()

    async def readyz(self, request: web.Request) -> web.Response:
        c = self.connections
        checks = dict(
            zip(
                ("kafka", "postgres", "redis"),
                await asyncio.gather(
                    _check(c.producer.client.fetch_all_metadata()),
                    _check(c.pg.fetchval("SELECT 1")),
                    _check(c.redis.ping()),
                ),
                strict=True,
            )
        )
        failing = [name for name, state in checks.items() if state != "ok"]
        if failing:
            raise Problem(
                503,
                "not ready",
                "; ".join(f"{name}: {checks[name]}" for name in failing),
                field=failing[0],
                failing=failing,
                checks=checks,
                headers={"Retry-After": "2"},
            )
        return json_response({"ready": True, "checks": checks})

    async def get_metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def get_openapi(self, request: web.Request) -> web.Response:
        return json_response(self.document)


async def _check(probe: Awaitable[Any]) -> str:
    try:
        await asyncio.wait_for(probe, check_timeout_s)
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok"
