"""Run one engine worker process: topics ensured, the engine and its web server started,
stopped cleanly on SIGTERM/SIGINT.

Local state needs no special care after a crash: RocksDB only ever holds batches whose
Kafka transaction committed, with the changelog offset they reached, so a start after
`kill -9` catches up from that offset like any other start (see `streams.store`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable

from core.errors import TallyError, exit_status, message
from core.logs import setup_logging
from core.settings import Settings
from streams.agreement import Disagreement
from streams.client import client_id_for
from streams.engine import Engine
from streams.web import WorkerWeb
from topics.admin import ensure_topics
from topics.names import engine_topic_specs

log = logging.getLogger(__name__)

# The cyclic garbage collector's thresholds in a worker (CPython's are 700, 10, 10). A
# poll keeps up to 128,000 records and all their outputs alive at once, and with the
# defaults a 200,000-command drain ran 2,500 young collections and 16 full ones (a full
# one walks every live object): 2.1 s of the worker's 20 s of CPU, counted with
# `gc.callbacks`. Almost everything the engine makes is freed by reference counting, so
# young collections are made rarer and full ones rarer still (at most once every
# 20,000,000 net allocations, which still bounds cyclic garbage). `tally bench engine
# --count 200000 --guarantee exactly_once`, these alternated with the defaults (#21):
# 21,928 and 22,289 commands/s against 20,901 and 18,622 (per CPU second 26,455 and
# 24,661 against 23,068 and 20,555). In a slower hour, with 100,000, 50, 100 (the same
# first threshold; the drain ran 11 young collections and nothing else): 21,841 and
# 20,585 against 15,922 and 16,240.
gc_thresholds = (100_000, 20, 10)


def advertised_host(settings: Settings) -> str:
    """The host other workers reach this one's web server at (see `web_advertised_host`)."""
    if settings.web_advertised_host == "auto":
        return socket.gethostbyname(socket.gethostname())
    return settings.web_advertised_host or settings.web_host


class VerificationRetries(logging.Filter):
    """Fold aiokafka's per-partition warning for a retried NOT_ENOUGH_REPLICAS into one
    line a minute with a count. Kafka >= 3.8 answers it when its check that a partition is
    in the transaction could not be made (see `streams.transaction`), and a broker of a
    cluster without enough replicas in sync answers it too; the retry lands, but one
    warning per partition per batch would bury every other log line."""

    every_s = 60.0

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.since = time.monotonic()

    def filter(self, record: logging.LogRecord) -> bool:
        if "NotEnoughReplicasError" not in record.getMessage():
            return True
        self.count += 1
        now = time.monotonic()
        if now - self.since < self.every_s:
            return False
        record.msg = "%d produce requests retried on NOT_ENOUGH_REPLICAS in the last %.0fs"
        record.args = (self.count, now - self.since)
        self.count, self.since = 0, now
        return True


def quiet_verification_retries() -> None:
    logging.getLogger("aiokafka.producer.sender").addFilter(VerificationRetries())


async def serve(
    settings: Settings,
    *,
    app_id: str | None = None,
    job: Callable[[Engine], Awaitable[None]] | None = None,
) -> Engine:
    """Run a worker until a signal, or until `job` (run beside it) returns."""
    quiet_verification_retries()
    engine = Engine(settings, app_id=app_id)
    await ensure_topics(settings.kafka_bootstrap, engine_topic_specs(settings, engine.app_id))
    advertised = advertised_host(settings)
    web = WorkerWeb(engine, settings.web_host, settings.web_port, advertised=advertised)
    await web.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, engine.stop)
    run = asyncio.create_task(
        engine.run(client_id=client_id_for(advertised, settings.web_port)), name="engine"
    )
    side = None
    if job is not None:

        async def job_then_stop() -> None:
            try:
                await job(engine)
            finally:
                engine.stop()

        side = asyncio.create_task(job_then_stop(), name="job")
    try:
        await run
    finally:
        if side is not None:
            side.cancel()
            await asyncio.gather(side, return_exceptions=True)
        await web.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return engine


def run(settings: Settings) -> int:
    """Run the worker until it is stopped; return its exit code."""
    setup_logging(settings, "engine worker")
    gc.set_threshold(*gc_thresholds)
    try:
        asyncio.run(serve(settings))
    except Disagreement:
        return 1  # said in one line when the group refused it
    except TallyError as exc:
        # Topics that cannot be made as configured (a replication the cluster cannot
        # hold, a partition count that differs): one line and the family's status.
        log.error("engine worker: %s", message(exc))
        return exit_status(exc)
    except Exception:
        log.exception("engine worker failed")
        return 1
    return 0
