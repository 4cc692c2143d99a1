"""Build and run the sinks from settings: alone (`tally sink postgres|redis`) or beside
the engine in one process (the demo)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

import asyncpg
from redis.exceptions import DataError as RedisDataError
from redis.exceptions import ResponseError

from core.errors import TallyError, exit_status, message
from core.logs import setup_logging
from core.settings import Settings
from core.supervise import supervise as supervise_children
from sinks.migrate import migrate
from sinks.postgres import PostgresStore
from sinks.redis_store import RedisStore
from sinks.runner import SinkRunner, Store
from sinks.web import SinkWeb
from topics.admin import ensure_topics
from topics.names import deployment_topics, redis_prefix, schema_name, sink_group

log = logging.getLogger(__name__)

TARGETS = ("postgres", "redis")


def store_for(settings: Settings, target: str) -> Store:
    if target == "postgres":
        return PostgresStore(settings.pg_dsn, schema_name(settings))
    if target == "redis":
        return RedisStore(
            settings.redis_url,
            redis_prefix(settings),
            settings.partitions,
            cluster=settings.redis_cluster,
        )
    raise ValueError(f"unknown sink target {target!r}")


# What PostgreSQL answers about a value it cannot hold (class 22 data exceptions: a number
# out of range, a NUL in text; class 23 constraint violations; class 54 program limits, an
# index row too large) and what asyncpg raises before sending one (a number too large for
# its column's type, a time past the year 9999): the event's content, not an outage.
_POSTGRES_CONTENT = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    OverflowError,
)
# Redis answers an outage with its own error prefixes (redis-py maps most to subclasses:
# ReadOnlyError, NoScriptError, OutOfMemoryError...); a plain error from the script is
# the script failing on an event's values.
_REDIS_OUTAGES = (
    "OOM", "LOADING", "BUSY", "READONLY", "MASTERDOWN", "CLUSTERDOWN",
    "TRYAGAIN", "NOSCRIPT", "NOAUTH", "NOPERM", "WRONGPASS", "MOVED", "ASK",
)  # fmt: skip


def postgres_content_error(error: BaseException) -> bool:
    """Whether the PostgreSQL store refused a batch for a value of its events."""
    return isinstance(error, _POSTGRES_CONTENT)


def redis_content_error(error: BaseException) -> bool:
    """Whether the Redis store refused a batch for a value of its events: the script's
    own error, or a value the client cannot send."""
    if isinstance(error, RedisDataError):
        return True
    if type(error) is not ResponseError:
        return False  # its subclasses are the server's states (read-only, no script...)
    # A pipeline prefixes the server's answer with "Command # n (...) of pipeline caused
    # error: ".
    answer = str(error).rpartition("caused error: ")[2].lstrip("('\"")
    return not answer.startswith(_REDIS_OUTAGES)


def content_error_of(target: str) -> Callable[[BaseException], bool]:
    return postgres_content_error if target == "postgres" else redis_content_error


def runner_for(
    settings: Settings,
    target: str,
    partitions: list[int] | None = None,
    *,
    store: Store | None = None,
    until: dict[int, int] | None = None,
) -> SinkRunner:
    """The sink of `target`: a member of its consumer group, or with `until` a replay
    of `partitions` up to those end offsets (no group)."""
    return SinkRunner(
        store if store is not None else store_for(settings, target),
        bootstrap=settings.kafka_bootstrap,
        topics=deployment_topics(settings),
        group_id=None if until is not None else sink_group(settings, target),
        batch_size=settings.sink_batch_size,
        linger_ms=settings.sink_linger_ms,
        partitions=partitions,
        until=until,
        content_error=content_error_of(target),
    )


async def prepare(settings: Settings, target: str) -> None:
    """What a sink needs before it starts: its topics, and for PostgreSQL the schema."""
    topics = deployment_topics(settings)
    await ensure_topics(settings.kafka_bootstrap, list(topics.all()))
    if target == "postgres":
        await migrate(settings.pg_dsn, schema_name(settings), settings.partitions, say=log.info)


def web_port_of(settings: Settings, target: str) -> int:
    """The port of `target`'s web server (0: none)."""
    return settings.sink_postgres_web_port if target == "postgres" else settings.sink_redis_web_port


async def serve(
    settings: Settings,
    target: str,
    partitions: list[int] | None = None,
    *,
    web_port: int | None = None,
) -> None:
    """One sink process; its web server on `web_port` (default: the target's setting)."""
    await prepare(settings, target)
    runner = runner_for(settings, target, partitions)
    port = web_port_of(settings, target) if web_port is None else web_port
    server = SinkWeb(runner, target, settings.sink_web_host, port) if port else None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stop)
    what = "group" if partitions is None else f"partitions {partitions} of group"
    log.info("sink %s: consuming %s, %s %s", target, runner.topic, what, runner.group_id)
    if server is not None:
        await server.start()
        log.info("sink %s: web on http://%s:%d", target, settings.sink_web_host, port)
    try:
        await runner.run()
    finally:
        if server is not None:
            await server.stop()


def split(partitions: int, processes: int) -> list[list[int]]:
    """Partition p goes to process p % processes (never an empty process)."""
    groups = [[p for p in range(partitions) if p % processes == k] for k in range(processes)]
    return [g for g in groups if g]


async def supervise(settings: Settings, target: str, processes: int) -> None:
    """Run the sink as several processes, each with a fixed share of the partitions.

    One Python process tops out before PostgreSQL does (decoding, row building and
    COPY encoding are CPU work in the sink), so a sink can spread over processes. The
    shares are fixed (no consumer-group rebalancing between them); a process that dies
    is started again after a second and resumes from its store's offsets."""
    await prepare(settings, target)
    shares = split(settings.partitions, processes)
    log.info("sink %s: %d processes, partitions %s", target, len(shares), shares)
    await supervise_children(f"sink {target}", child_commands(settings, target, shares))


def child_commands(settings: Settings, target: str, shares: list[list[int]]) -> list[list[str]]:
    """The command of each process of `tally sink --processes N`: its share of the
    partitions, and its own web port (the target's port + 1 + k; 0 stays 0, none)."""
    base = web_port_of(settings, target)
    return [
        [sys.executable, "-m", "sinks", target,
         "--partitions", ",".join(str(p) for p in share),
         "--web-port", str(base + 1 + k if base else 0)]
        for k, share in enumerate(shares)
    ]  # fmt: skip


def run(
    settings: Settings,
    target: str,
    *,
    processes: int = 1,
    partitions: list[int] | None = None,
    web_port: int | None = None,
) -> int:
    setup_logging(settings, f"sink {target}")
    try:
        if processes > 1:
            asyncio.run(supervise(settings, target, processes))
        else:
            asyncio.run(serve(settings, target, partitions, web_port=web_port))
    except TallyError as exc:
        # Topics that cannot be made as configured, a schema that cannot be migrated:
        # one line and the family's status, no traceback.
        log.error("sink %s: %s", target, message(exc))
        return exit_status(exc)
    except Exception:
        log.exception("sink %s failed", target)
        return 1
    return 0
