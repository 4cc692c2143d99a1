"""Before a replay: what it covers (the events topic's offsets now), whether a live sink
writes to the target (its consumer group's members), and whether the store answers. Any
reason not to run is a ReplayError with one line for the operator."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocol
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from core.errors import CANNOT_RUN, TallyError
from core.settings import Settings
from sinks.migrate import MigrationError, migrate
from sinks.runner import Store
from topics.names import schema_name, sink_group

log = logging.getLogger(__name__)

# How long the checks before a replay may wait on Kafka (the stores bound their own
# connection attempts at 5 s): past it, Kafka counts as unreachable.
kafka_check_timeout_s = 10.0


class ReplayError(TallyError):
    """The replay cannot start: a store or Kafka unreachable, a live sink on the target,
    no events topic. The message is one line, for the operator."""

    exit_code = CANNOT_RUN


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one replay covers: per partition, the first retained offset and the end
    offset (the last stable offset) at the start."""

    topic: str
    beginning: dict[int, int]
    end: dict[int, int]

    @property
    def offsets(self) -> int:
        return sum(self.end[p] - self.beginning[p] for p in self.end)


def describe_store(settings: Settings, target: str) -> str:
    """The target store as an operator would look for it (passwords masked)."""
    shown = settings.redacted()
    if target == "postgres":
        return f"PostgreSQL schema {schema_name(settings)} at {shown['pg_dsn']}"
    return f"Redis keys {settings.topic_prefix}:* at {shown['redis_url']}"


async def kafka_plan(settings: Settings, topic: str, target: str) -> tuple[Plan, list[str]]:
    """The plan (the topic's offsets now) and the live members of the target's sink group."""
    bootstrap = settings.kafka_bootstrap
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",  # end offsets are then the last stable ones
    )
    try:
        with _quiet("aiokafka"):  # its connection errors would each log a line
            async with asyncio.timeout(kafka_check_timeout_s):
                await admin.start()
                partitions = await _partitions(admin, settings, topic)
                members = await _members(admin, settings, target, topic)
                await consumer.start()
                tps = [TopicPartition(topic, p) for p in partitions]
                beginning = await consumer.beginning_offsets(tps)
                end = await consumer.end_offsets(tps)
    except (KafkaError, OSError, TimeoutError) as exc:
        raise ReplayError(f"Kafka unreachable at {bootstrap} ({one_line(exc)})") from None
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
        with contextlib.suppress(Exception):
            await admin.close()
    plan = Plan(
        topic=topic,
        beginning={tp.partition: o for tp, o in beginning.items()},
        end={tp.partition: o for tp, o in end.items()},
    )
    return plan, members


async def _partitions(admin: AIOKafkaAdminClient, settings: Settings, topic: str) -> list[int]:
    # Listed before described: describing a missing topic may create it.
    if topic not in await admin.list_topics():
        raise ReplayError(
            f"Kafka at {settings.kafka_bootstrap} has no topic {topic}: "
            "nothing to replay (is TALLY_TOPIC_PREFIX right?)"
        )
    (described,) = await admin.describe_topics([topic])
    partitions = sorted(p["partition"] for p in described["partitions"])
    if len(partitions) != settings.partitions:
        raise ReplayError(
            f"topic {topic} has {len(partitions)} partitions but TALLY_PARTITIONS "
            f"is {settings.partitions}"
        )
    return partitions


async def _members(
    admin: AIOKafkaAdminClient, settings: Settings, target: str, topic: str
) -> list[str]:
    """The live members of the target's sink group, as 'client at host, partitions'."""
    group = sink_group(settings, target)
    found = []
    for response in await admin.describe_consumer_groups([group]):
        for described in response.groups:
            for member in described[5]:
                client_id, host, raw = member[1], member[2], member[-1]
                found.append(f"{client_id} at {host}, partitions {_assigned(raw, topic)}")
    return found


def _assigned(raw: bytes, topic: str) -> list[int]:
    if not raw:
        return []  # joined, not yet assigned
    assignment = ConsumerProtocol.ASSIGNMENT.decode(raw)
    return sorted(p for t, ps in assignment.assignment if t == topic for p in ps)


async def check_store(settings: Settings, target: str, store: Store) -> None:
    """The store answers; PostgreSQL's schema is migrated (the sink's own migrations:
    into an empty store means maybe no schema yet)."""
    where = describe_store(settings, target)
    name = "PostgreSQL" if target == "postgres" else "Redis"
    try:
        await store.open()
    except Exception as exc:  # any reason it will not answer: refused, auth, no db
        raise ReplayError(f"{name} unreachable: {where} ({one_line(exc)})") from None
    finally:
        with contextlib.suppress(Exception):
            await store.close()
    if target == "postgres":
        try:
            await migrate(settings.pg_dsn, schema_name(settings), settings.partitions, say=log.info)
        except MigrationError as exc:
            raise ReplayError(f"{where}: {exc}") from None


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a library's logger below CRITICAL for a moment (its errors are ours to say)."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        target.setLevel(level)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"
