"""Build and run the sinks from settings: alone (`tally sink postgres|redis`) or beside
the engine in one process (the demo)."""

from __future__ import annotations

import asyncio
import logging
import signal

from sinks.migrate import migrate
from sinks.postgres import PostgresStore
from sinks.redis_store import RedisStore
from sinks.runner import SinkRunner, Store
from tally.settings import Settings
from topics.admin import ensure_topics
from topics.specs import topics_for

log = logging.getLogger(__name__)

TARGETS = ("postgres", "redis")


def schema_of(settings: Settings) -> str:
    """A deployment's PostgreSQL schema: its topic prefix."""
    return settings.topic_prefix


def group_of(settings: Settings, target: str) -> str:
    return f"{settings.topic_prefix}-sink-{target}"


def runner_for(settings: Settings, target: str) -> SinkRunner:
    store: Store
    if target == "postgres":
        store = PostgresStore(settings.pg_dsn, schema_of(settings))
    elif target == "redis":
        store = RedisStore(settings.redis_url, settings.topic_prefix)
    else:
        raise ValueError(f"unknown sink target {target!r}")
    return SinkRunner(
        store,
        bootstrap=settings.kafka_bootstrap,
        topics=topics_for(settings.topic_prefix, settings.partitions),
        group_id=group_of(settings, target),
        batch_size=settings.sink_batch_size,
        linger_ms=settings.sink_linger_ms,
    )


async def prepare(settings: Settings, target: str) -> None:
    """What a sink needs before it starts: its topics, and for PostgreSQL the schema."""
    topics = topics_for(settings.topic_prefix, settings.partitions)
    await ensure_topics(settings.kafka_bootstrap, list(topics.all()))
    if target == "postgres":
        await migrate(settings.pg_dsn, schema_of(settings), settings.partitions, say=log.info)


async def serve(settings: Settings, target: str) -> None:
    await prepare(settings, target)
    runner = runner_for(settings, target)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stop)
    log.info("sink %s: consuming %s as group %s", target, runner.topic, runner.group_id)
    await runner.run()


def run(settings: Settings, target: str) -> int:
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(settings, target))
    except Exception:
        log.exception("sink %s failed", target)
        return 1
    return 0
