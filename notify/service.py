"""`tally notify`: the process that runs every subscription's deliveries.

It is a member of the consumer group <prefix>-notify on the events topic, which shares
the partitions among the notifier processes (scalable like the sinks). The group's own
consumer only holds the membership (its partitions stay paused); each running
subscription reads the group's partitions with a reader of its own (`notify.deliver`)
from the progress stored in PostgreSQL. After every refresh the group's offsets are
committed as the lowest stored watermark over the subscriptions, for lag monitoring
only: a restart resumes from each subscription's own progress. One writer
(`notify.lanes`) stores every lane's done offset before that lane goes on, on a
connection of its own.

Subscriptions are re-read every `notify_refresh_ms`: a new or resumed one starts, a
paused or deleted one stops (a resumed one goes on from where it stopped: nothing is
skipped while paused), a changed one or one whose reader failed restarts. /livez,
/readyz and /metrics answer on TALLY_WEB_HOST:TALLY_NOTIFY_PORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

import aiohttp
from aiohttp import web
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.structs import TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics
from prometheus_client.exposition import generate_latest

from core.http import WebServer, json_response, livez
from core.logs import setup_logging
from core.settings import Settings
from notify import store
from notify.deliver import Config, Reader, Redelivery
from notify.lanes import LaneLog
from notify.metrics import Metrics
from notify.resolver import PublicOnly
from sinks import pg
from sinks.migrate import migrate
from topics.admin import ensure_topics
from topics.names import deployment_topics, notify_group, schema_name

log = logging.getLogger(__name__)
CHECK_TIMEOUT_S = 2.0


def config_of(settings: Settings) -> Config:
    return Config(
        timeout_s=settings.notify_timeout_ms / 1000,
        backoff_first_s=settings.notify_backoff_first_ms / 1000,
        backoff_max_s=settings.notify_backoff_max_ms / 1000,
        horizon_s=float(settings.notify_retry_horizon_s),
        concurrency=settings.notify_concurrency,
        queue_max=settings.notify_queue_max,
        progress_s=settings.notify_progress_ms / 1000,
    )


class Notifier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = deployment_topics(settings)
        self.topic = self.topics.events.name
        self.config = config_of(settings)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.metrics = Metrics()
        self.readers: dict[str, Reader] = {}
        self.redeliveries: dict[str, Redelivery] = {}
        self.assigned: set[int] = set()
        self.joined = False
        self.pool: Any = None
        self.lanes_pool: Any = None
        self.lane_log = LaneLog(self._save_lanes)
        self.http: aiohttp.ClientSession | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        topics = list(self.topics.all())
        await ensure_topics(self.settings.kafka_bootstrap, topics)
        await migrate(
            self.settings.pg_dsn, self.settings.topic_prefix, self.settings.partitions, say=log.info
        )
        self.pool = await pg.create_pool(
            self.settings.pg_dsn, schema_name(self.settings), min_size=1, max_size=4
        )
        # The lanes' writer: one connection, asynchronous commits (notify.lanes says why
        # that is safe), no reset query after each statement (it sets no session state).
        self.lanes_pool = await pg.create_pool(
            self.settings.pg_dsn,
            schema_name(self.settings),
            min_size=1,
            max_size=1,
            reset=_no_reset,
            server_settings={"synchronous_commit": "off"},
        )
        # No connection pool limit per host beyond the lanes: each lane has one request.
        resolver = None if self.settings.notify_allow_private else PublicOnly()
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, resolver=resolver)
        )
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=notify_group(self.settings),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        self.consumer.subscribe([self.topic], listener=_Listener(self))
        web_server = await self._serve_web()
        await self.consumer.start()
        log.info("notify: consuming %s in group %s", self.topic, notify_group(self.settings))
        lane_writer = asyncio.create_task(self.lane_log.run(), name="notify lanes")
        try:
            while not self._stopping.is_set():
                # Keeps the membership alive (its partitions are paused: nothing comes).
                await self.consumer.getmany(timeout_ms=self.settings.notify_refresh_ms)
                await self._refresh()
        finally:
            for reader in [*self.readers.values(), *self.redeliveries.values()]:
                await reader.stop()
            lane_writer.cancel()
            await asyncio.gather(lane_writer, return_exceptions=True)
            with contextlib.suppress(Exception):  # else repeated after the restart
                await asyncio.wait_for(self.lane_log.flush(), CHECK_TIMEOUT_S)
            await self._commit()
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            await web_server.stop()
            await self.http.close()
            await self.lanes_pool.close()
            await self.pool.close()

    async def _refresh(self) -> None:
        try:
            subs = await asyncio.wait_for(store.all_subscriptions(self.pool), CHECK_TIMEOUT_S * 2)
        except Exception as exc:
            log.warning("notify: cannot read subscriptions (%s); keeping the running ones", exc)
            return
        wanted = {s.id: s for s in subs if not s.paused} if self.joined else {}
        partitions = sorted(self.assigned)
        for sub_id, reader in list(self.readers.items()):
            sub = wanted.get(sub_id)
            stale = sub is None or sub != reader.sub or reader.partitions != partitions
            if stale or reader.failed():  # a failed one (PostgreSQL, Kafka) starts again
                await reader.stop()
                del self.readers[sub_id]
        if partitions:
            for sub_id, sub in wanted.items():
                if sub_id not in self.readers:
                    self.readers[sub_id] = self._reader(sub, partitions)
                    self.readers[sub_id].start()
        self.metrics.subscriptions.set(len(self.readers))
        await self._redeliver(wanted, partitions)
        await self._commit()

    async def _redeliver(
        self, wanted: dict[str, store.Subscription], partitions: list[int]
    ) -> None:
        """Start the pending redeliveries of running subscriptions; forget finished ones
        (a failed one is started again at the next refresh: it is still pending)."""
        for rid, reader in list(self.redeliveries.items()):
            if reader.task is not None and reader.task.done():
                del self.redeliveries[rid]
        try:
            pending = await store.pending_redeliveries(self.pool)
        except Exception as exc:
            log.warning("notify: cannot read redeliveries (%s)", exc)
            return
        assert self.http is not None
        for r in pending:
            sub = wanted.get(r.subscription_id)
            if sub is None or r.id in self.redeliveries or not partitions:
                continue
            reader = Redelivery(
                sub, r, bootstrap=self.settings.kafka_bootstrap, topic=self.topic,
                partitions=partitions, pool=self.pool, http=self.http, metrics=self.metrics,
                config=self.config, lane_log=self.lane_log,
            )  # fmt: skip
            self.redeliveries[r.id] = reader
            reader.start()

    def _reader(self, sub: store.Subscription, partitions: list[int]) -> Reader:
        assert self.http is not None
        return Reader(
            sub, bootstrap=self.settings.kafka_bootstrap, topic=self.topic,
            partitions=partitions, pool=self.pool, http=self.http, metrics=self.metrics,
            config=self.config, lane_log=self.lane_log,
        )  # fmt: skip

    async def _save_lanes(self, done: dict[tuple[str, int, int], int]) -> None:
        await store.save_lanes_done(self.lanes_pool, self.topic, self.config.concurrency, done)

    async def _commit(self) -> None:
        """The group's offsets: the lowest watermark over the running subscriptions."""
        if self.consumer is None or not self.readers:
            return
        lowest: dict[int, int] = {}
        for reader in self.readers.values():
            for p, o in reader.watermarks().items():
                lowest[p] = min(o, lowest.get(p, o))
        offsets = {
            TopicPartition(self.topic, p): o for p, o in lowest.items() if p in self.assigned
        }
        if offsets:
            with contextlib.suppress(Exception):
                await self.consumer.commit(offsets)

    async def _serve_web(self) -> WebServer:
        app = web.Application()
        app.router.add_get("/livez", livez, allow_head=False)
        app.router.add_get("/readyz", self._readyz, allow_head=False)
        app.router.add_get("/metrics", self._metrics, allow_head=False)
        server = WebServer(app, self.settings.web_host, self.settings.notify_port)
        await server.start()
        log.info("notify: web on %s:%d", self.settings.web_host, self.settings.notify_port)
        return server

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), CHECK_TIMEOUT_S)
            postgres = "ok"
        except Exception as exc:
            postgres = type(exc).__name__
        kafka = "ok" if self.joined else "not in the group yet"
        checks = {"kafka": kafka, "postgres": postgres}
        ready = all(v == "ok" for v in checks.values())
        body = {
            "ready": ready,
            "checks": checks,
            "partitions": sorted(self.assigned),
            "subscriptions": len(self.readers),
        }
        return json_response(body, 200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )


async def _no_reset(connection: Any) -> None:
    return None


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Readers of revoked partitions stop before the next owner's start (it may
        # repeat what was in flight: at-least-once).
        self.notifier.assigned -= {tp.partition for tp in revoked}
        for sub_id, reader in list(self.notifier.readers.items()):
            await reader.stop()
            del self.notifier.readers[sub_id]

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self.notifier.consumer
        assert consumer is not None
        consumer.pause(*assigned)
        self.notifier.assigned = {tp.partition for tp in assigned}
        self.notifier.joined = True


async def serve(settings: Settings) -> None:
    notifier = Notifier(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, notifier.stop)
    await notifier.run()


def run(settings: Settings) -> int:
    # The one logging setup of every process (start line, JSON format, aiokafka quiet).
    setup_logging(settings, "notify")
    try:
        asyncio.run(serve(settings))
    except Exception:
        log.exception("notify failed")
        return 1
    return 0
