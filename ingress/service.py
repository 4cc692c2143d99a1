"""Run the ingress: alone (`tally ingress`, one or several processes on one port with
SO_REUSEPORT) or beside the engine and sinks in one process (the demo)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from core.errors import TallyError, exit_status, message
from core.http import WebServer
from core.logs import setup_logging
from core.settings import Settings
from core.supervise import supervise
from ingress.app import Ingress
from ingress.protocol import ProblemRunner
from sinks.migrate import migrate
from topics.admin import ensure_topics
from topics.names import deployment_topics

log = logging.getLogger(__name__)


async def prepare(settings: Settings) -> None:
    """Topics (the ingress may start before any engine) and the PostgreSQL schema that
    `GET /v1/commands/{id}` reads."""
    await ensure_topics(settings.kafka_bootstrap, deployment_topics(settings).all())
    await migrate(settings.pg_dsn, settings.topic_prefix, settings.partitions, say=log.info)


async def start(settings: Settings) -> web.AppRunner:
    """Start an ingress on settings.ingress_host:port; stop it with `runner.cleanup()`."""
    ingress = Ingress(settings)
    runner = ProblemRunner(
        ingress.app,
        on_error=ingress.metrics.refused_by_parser,
        access_log=None,
        handle_signals=False,
    )
    server = WebServer(
        runner, settings.ingress_host, settings.ingress_port, reuse_port=True, backlog=2048
    )
    await server.start()
    log.info("ingress: listening on http://%s:%d", settings.ingress_host, settings.ingress_port)
    return runner


async def serve(settings: Settings) -> None:
    await prepare(settings)
    runner = await start(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        await runner.cleanup()


def run(settings: Settings, *, processes: int = 1) -> int:
    setup_logging(settings, "ingress")
    try:
        Ingress.check(settings)
        if processes > 1:
            asyncio.run(prepare(settings))
            command = [sys.executable, "-m", "ingress"]
            asyncio.run(supervise("ingress", [command] * processes))
        else:
            asyncio.run(serve(settings))
    except TallyError as exc:
        # Settings, or topics that cannot be made as configured (replication the
        # cluster cannot hold): one line and the family's status, no traceback.
        log.error("ingress: %s", message(exc))
        return exit_status(exc)
    except Exception:
        log.exception("ingress failed")
        return 1
    return 0
