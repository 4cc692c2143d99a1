"""What one ingress process connects to, opened at startup and closed at cleanup: the
durable Kafka producer, the result reader, Redis (cached balances, the replay check),
PostgreSQL (results, history, subscriptions) and the HTTP session to engine workers."""

from __future__ import annotations

import contextlib
from typing import Any

import aiohttp

from core.settings import Settings
from ingress.replay import SeenSignatures
from ingress.results import ResultWaiter
from sinks import pg, redis_client
from topics.names import deployment_topics, schema_name
from topics.producer import durable_producer

# A read forwarded to an engine worker waits this long for its answer.
engine_timeout_s = 5.0


class Connections:
    """The Kafka clients exist from the start (not connected); the others once `open`
    ran (None before)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        topics = deployment_topics(settings)
        self.producer = durable_producer(
            settings.kafka_bootstrap,
            linger_ms=2,
            max_batch_size=512 * 1024,
            request_timeout_ms=settings.ingress_produce_timeout_ms,
        )
        self.waiter = ResultWaiter(
            settings.kafka_bootstrap, topics.events.name, settings.partitions
        )
        self.redis: Any = None
        self.seen: SeenSignatures | None = None
        self.pg: Any = None
        self.http: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        settings = self.settings
        await self.producer.start()
        await self.waiter.start()
        self.redis = redis_client.connect_to(settings, socket_timeout=5, socket_connect_timeout=2)
        self.seen = SeenSignatures(self.redis, settings.topic_prefix)
        self.pg = await pg.create_pool(
            settings.pg_dsn,
            schema_name(settings),
            min_size=0,
            max_size=4,
            exact_money=True,  # money as exact ints (ingress.reads)
        )
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=engine_timeout_s))

    async def close(self) -> None:
        """Close whatever is open, each on its own: one failing stops none of the others."""
        for closing in (
            self.http.close() if self.http else None,
            self.pg.close() if self.pg else None,
            self.seen.close() if self.seen else None,
            self.redis.aclose() if self.redis else None,
            self.waiter.stop(),
            self.producer.stop(),
        ):
            if closing is not None:
                with contextlib.suppress(Exception):
                    await closing
