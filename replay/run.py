"""`tally replay`: rebuild one sink store from the events topic, from the beginning up to
the end offsets taken at the start, then stop and say how it went.

The replay is the sink itself (a `SinkRunner` over the same store) in its replay mode:
every partition assigned statically, no consumer group, nothing committed to Kafka. The
stores absorb repeats (PostgreSQL inserts ON CONFLICT and upserts balances forward only;
Redis is last-writer-wins on `seq`), so it may run into an empty store or over a full
one. An event the live sink dead-letters (undecodable, out of the schema's bounds, or
refused by the store for its content) the replay skips the same way, without sending
its dead letter again, and counts. It refuses to run while a live sink of the same
target is a member of its consumer group, unless forced, and fails fast, naming the
store, when the store or Kafka does not answer.

Offsets. The Redis sink resumes from the progress it keeps in Redis, which the script
only ever moves forward: the replay's batches may raise it, never lower it, and
everything before it is in Redis whichever of the two wrote it. The PostgreSQL sink
resumes from `sink_offsets`, which its store writes in each batch's transaction; left
as they are, a replay's batches would move the live sink's offsets back to 0 and then
up again. So the replay's batches file their
offsets under `<topic>#replay` instead (its progress, removed at the end), and only a
replay that reached the end raises the live sink's offsets, in one statement, to at
least the end offsets taken at the start: `greatest(stored, end)`. They never move back,
so a live sink started afterwards neither rewrites what the replay wrote nor skips past
what it has not (everything before `end` is in the store now, and a sink that had gone
further keeps its own). An interrupted replay leaves them exactly as they were. (So
whoever empties the tables by hand empties sink_offsets with them: offsets left behind
would tell a sink started before the replay ends that rows are there that are not.)

What it cannot see: a sink run as `tally sink --processes N` assigns its partitions
itself and joins no group, so it is not listed as a member and does not stop a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterator

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocol
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from core.errors import CANNOT_RUN, TallyError
from core.logs import setup_logging
from core.progress import Progress
from core.settings import Settings
from sinks import pg, service
from sinks.migrate import MigrationError, migrate
from sinks.runner import Batch, SinkRunner, Store
from topics.names import deployment_topics, schema_name, sink_group

log = logging.getLogger(__name__)

# How long the checks before a replay may wait on Kafka (the stores bound their own
# connection attempts at 5 s): past it, Kafka counts as unreachable.
kafka_check_timeout_s = 10.0
# Where a PostgreSQL replay files its batches' offsets in sink_offsets: `<topic>` + this.
offsets_aside_suffix = "#replay"

_OFFSETS_AT_LEAST = """
INSERT INTO sink_offsets (topic, partition, next_offset)
SELECT $1, * FROM unnest($2::int[], $3::bigint[])
ON CONFLICT (topic, partition) DO UPDATE
    SET next_offset = greatest(sink_offsets.next_offset, excluded.next_offset)
"""


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


@dataclasses.dataclass(frozen=True)
class Summary:
    target: str
    store: str
    events: int
    entries: int
    undecodable: int
    offsets: int
    seconds: float
    completed: bool

    @property
    def events_per_s(self) -> float:
        return self.events / max(self.seconds, 1e-9)

    @property
    def entries_per_s(self) -> float:
        return self.entries / max(self.seconds, 1e-9)

    def lines(self) -> list[str]:
        state = "done" if self.completed else "INTERRUPTED (the store holds what was written)"
        lines = [
            f"replay {self.target}: {state}, into {self.store}",
            f"  events       {self.events:>12,}",
            f"  entries      {self.entries:>12,}",
            f"  seconds      {self.seconds:>12.1f}",
            f"  events/s     {self.events_per_s:>12,.0f}",
            f"  entries/s    {self.entries_per_s:>12,.0f}",
        ]
        if self.undecodable:
            lines.append(
                f"  undecodable  {self.undecodable:>12,}  (skipped, as the live sink "
                "dead-letters them: not decodable, out of the schema's bounds, or refused "
                "by the store)"
            )
        return lines


def describe_store(settings: Settings, target: str) -> str:
    """The target store as an operator would look for it (passwords masked)."""
    shown = settings.redacted()
    if target == "postgres":
        return f"PostgreSQL schema {schema_name(settings)} at {shown['pg_dsn']}"
    return f"Redis keys {settings.topic_prefix}:* at {shown['redis_url']}"


class Replay:
    """One replay of one target. `force` replays beside a live sink; `store` replaces
    the store the sink would build (the tests use one with denser breakpoints); `say`
    and `tty` go to the progress display (default: stderr, a bar if it is a terminal)."""

    def __init__(
        self,
        settings: Settings,
        target: str,
        *,
        force: bool = False,
        store: Store | None = None,
        say: Callable[[str], None] | None = None,
        tty: bool | None = None,
    ) -> None:
        self.settings = settings
        self.target = target
        self.force = force
        self.store = store if store is not None else service.store_for(settings, target)
        self.say = say
        self.tty = tty
        self.topic = deployment_topics(settings).events.name
        self.runner: SinkRunner | None = None
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True
        if self.runner is not None:
            self.runner.stop()

    async def run(self) -> Summary:
        plan = await self.check()
        started = time.monotonic()
        completed = await self._replay(plan)
        runner = self.runner
        assert runner is not None
        return Summary(
            target=self.target,
            store=describe_store(self.settings, self.target),
            events=runner.written_events,
            entries=runner.written_entries,
            undecodable=runner.dead_lettered,
            offsets=plan.offsets,
            seconds=time.monotonic() - started,
            completed=completed,
        )

    async def check(self) -> Plan:
        """Kafka (the topic, its offsets, the live group), then the store; raise
        ReplayError with the reason when the replay must not or cannot run."""
        plan, members = await self._kafka()
        if members and not self.force:
            group = sink_group(self.settings, self.target)
            raise ReplayError(
                f"refusing to replay into {describe_store(self.settings, self.target)}: "
                f"consumer group {group} has {len(members)} live member(s) "
                f"({'; '.join(members)}), so a sink is writing to it now. Stop that sink "
                "first (a sink killed moments ago stays listed until its session times "
                "out), or pass --force to replay beside it"
            )
        await self._check_store()
        return plan

    async def _kafka(self) -> tuple[Plan, list[str]]:
        bootstrap = self.settings.kafka_bootstrap
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
                    partitions = await self._partitions(admin)
                    members = await self._members(admin)
                    await consumer.start()
                    tps = [TopicPartition(self.topic, p) for p in partitions]
                    beginning = await consumer.beginning_offsets(tps)
                    end = await consumer.end_offsets(tps)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise ReplayError(f"Kafka unreachable at {bootstrap} ({_one_line(exc)})") from None
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await admin.close()
        plan = Plan(
            topic=self.topic,
            beginning={tp.partition: o for tp, o in beginning.items()},
            end={tp.partition: o for tp, o in end.items()},
        )
        return plan, members

    async def _partitions(self, admin: AIOKafkaAdminClient) -> list[int]:
        # Listed before described: describing a missing topic may create it.
        if self.topic not in await admin.list_topics():
            raise ReplayError(
                f"Kafka at {self.settings.kafka_bootstrap} has no topic {self.topic}: "
                "nothing to replay (is TALLY_TOPIC_PREFIX right?)"
            )
        (described,) = await admin.describe_topics([self.topic])
        partitions = sorted(p["partition"] for p in described["partitions"])
        if len(partitions) != self.settings.partitions:
            raise ReplayError(
                f"topic {self.topic} has {len(partitions)} partitions but TALLY_PARTITIONS "
                f"is {self.settings.partitions}"
            )
        return partitions

    async def _members(self, admin: AIOKafkaAdminClient) -> list[str]:
        """The live members of the target's sink group, as 'client at host, partitions'."""
        group = sink_group(self.settings, self.target)
        found = []
        for response in await admin.describe_consumer_groups([group]):
            for described in response.groups:
                for member in described[5]:
                    client_id, host, raw = member[1], member[2], member[-1]
                    found.append(f"{client_id} at {host}, partitions {self._assigned(raw)}")
        return found

    def _assigned(self, raw: bytes) -> list[int]:
        if not raw:
            return []  # joined, not yet assigned
        assignment = ConsumerProtocol.ASSIGNMENT.decode(raw)
        return sorted(p for topic, ps in assignment.assignment if topic == self.topic for p in ps)

    async def _check_store(self) -> None:
        where = describe_store(self.settings, self.target)
        name = "PostgreSQL" if self.target == "postgres" else "Redis"
        try:
            await self.store.open()
        except Exception as exc:  # any reason it will not answer: refused, auth, no db
            raise ReplayError(f"{name} unreachable: {where} ({_one_line(exc)})") from None
        finally:
            with contextlib.suppress(Exception):
                await self.store.close()
        if self.target == "postgres":
            # Into an empty store means maybe no schema yet: the sink's own migrations.
            try:
                await migrate(
                    self.settings.pg_dsn,
                    schema_name(self.settings),
                    self.settings.partitions,
                    say=log.info,
                )
            except MigrationError as exc:
                raise ReplayError(f"{where}: {exc}") from None

    async def _replay(self, plan: Plan) -> bool:
        """Run the sink over the plan; True when it reached the end offsets."""
        store = self.store
        if self.target == "postgres":
            store = _OffsetsAside(store, plan.topic + offsets_aside_suffix)
        runner = self.runner = service.runner_for(
            self.settings, self.target, sorted(plan.end), store=store, until=dict(plan.end)
        )
        if self._stopped:
            runner.stop()
        # The bar counts offsets: events, plus the transaction markers between them (one
        # per engine transaction and partition), so it ends exactly at the total.
        with Progress(
            f"replay {self.target}", plan.offsets, unit="events", say=self.say, tty=self.tty
        ) as progress:
            runner.on_batch = _advance(progress, dict(plan.beginning))
            try:
                await runner.run()
            except BaseException:
                progress.label += " (failed)"
                if self.target == "postgres":
                    with contextlib.suppress(Exception):  # the failure is what to report
                        await self._settle_offsets(plan, raise_to_end=False)
                raise
            completed = not self._stopped
            if completed:
                progress.add(plan.offsets - progress.done)  # markers after the last event
            else:
                progress.label += " (interrupted)"
            if self.target == "postgres":
                await self._settle_offsets(plan, raise_to_end=completed)
        return completed

    async def _settle_offsets(self, plan: Plan, *, raise_to_end: bool) -> None:
        """Drop the replay's own progress rows; after a whole replay, raise the live
        sink's offsets to at least the end (see the module's docstring for why)."""
        conn = await pg.connect(self.settings.pg_dsn, schema_name(self.settings))
        try:
            async with conn.transaction():
                await conn.execute(
                    "DELETE FROM sink_offsets WHERE topic = $1", plan.topic + offsets_aside_suffix
                )
                if raise_to_end:
                    parts = sorted(plan.end.items())
                    await conn.execute(
                        _OFFSETS_AT_LEAST, plan.topic, [p for p, _ in parts], [o for _, o in parts]
                    )
        finally:
            await conn.close()


class _OffsetsAside:
    """A store whose batches file their offsets under another name than the topic's.

    PostgreSQL keys sink_offsets by a batch's topic; a replay's batches, renamed, keep
    their offsets (their progress) apart from the live sink's. The rows are the same."""

    def __init__(self, inner: Store, topic: str) -> None:
        self.inner = inner
        self.topic = topic
        self.name = inner.name
        self.unavailable = inner.unavailable

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def offsets(self, topic: str) -> dict[int, int]:
        return await self.inner.offsets(topic)

    async def write(self, batch: Batch) -> None:
        await self.inner.write(dataclasses.replace(batch, topic=self.topic))


def _advance(progress: Progress, position: dict[int, int]) -> Callable[[Batch], None]:
    """A runner's on_batch callback moving `progress` by the offsets each batch covers."""

    def on_batch(batch: Batch) -> None:
        moved = 0
        for partition, offset in batch.offsets.items():
            moved += offset - position.get(partition, offset)
            position[partition] = offset
        progress.add(moved)

    return on_batch


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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"


def run(
    settings: Settings,
    target: str,
    *,
    force: bool,
    out: Callable[[str], None],
) -> int:
    """The `tally replay` command: 0 when done, 1 when interrupted (SIGINT, SIGTERM);
    a ReplayError when it must not or cannot start (the CLI exits with its status, 2)."""
    setup_logging(settings, f"replay {target}", quiet=True)
    summary = asyncio.run(_run(Replay(settings, target, force=force)))
    for line in summary.lines():
        out(line)
    return 0 if summary.completed else 1


async def _run(job: Replay) -> Summary:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, job.stop)
    return await job.run()
