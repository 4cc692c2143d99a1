"""Producing the deposits and waiting for their results: the Kafka producer, the reader
of the events topic, and the matching of each result to the record this run produced."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import (
    AsyncIterator,
    Callable,
)
from typing import Any, Protocol

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from core.progress import Progress
from core.settings import Settings
from importer.report import Outcomes, outcome_of
from importer.rows import (
    ImportFailed,
    Row,
    connect_timeout_s,
    flush_timeout_s,
    in_flight_max,
    one_line,
    poll_timeout_ms,
)
from topics.admin import TopicMismatch, ensure_topics
from topics.codec import decode_result, encode
from topics.correlate import Awaited, Correlator
from topics.names import deployment_topics
from topics.producer import durable_producer
from topics.schema import Result, source_in
from topics.shard import shard_of
from topics.specs import Topics

log = logging.getLogger(__name__)


async def _started(client: Any) -> None:
    """Start an aiokafka client; one that fails to start is closed, not leaked."""
    try:
        await client.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.stop()
        raise


class _Head(msgspec.Struct):
    account: str
    command_id: str


_head = msgspec.json.Decoder(_Head)


class Matcher:
    """This run's produced rows, waiting for their results (topics.correlate). A result
    counts only when its `tally-source` header names the record this run produced: the
    result of an earlier run of the same import, still on its way, is not taken for
    this run's. Ids are unique within a run: a pair on two rows is never produced."""

    def __init__(self) -> None:
        self.correlator = Correlator()
        self.pending: dict[str, Awaited] = {}  # command id -> the row's record
        self.outcomes = Outcomes()

    def __len__(self) -> int:
        return len(self.pending)

    def expect(self, row: Row) -> None:
        """Before producing the row."""

        def answered(result: Result) -> None:
            del self.pending[row.command_id]
            self.outcomes.add(row, outcome_of(result))

        self.pending[row.command_id] = self.correlator.expect(row.account, row.command_id, answered)

    def acknowledged(self, row: Row, partition: int, offset: int) -> None:
        awaited = self.pending.get(row.command_id)
        if awaited is not None:
            awaited.produced(partition, offset)

    def failed(self, row: Row) -> None:
        """Kafka did not take the row: no result will come for it from this run."""
        awaited = self.pending.pop(row.command_id, None)
        if awaited is not None:
            self.correlator.forget(awaited)

    def offer(self, value: bytes, source: bytes | None) -> None:
        """A record of the events topic, with its source header. Only the results of
        this run's ids are decoded whole."""
        if not self.pending:
            return
        try:
            head = _head.decode(value)
            if not self.correlator.awaits(head.account, head.command_id):
                return
            result = decode_result(value)
        except msgspec.MsgspecError:
            return
        self.correlator.offer(result, source)


class Sender(Protocol):
    """What `run` produces with: `Publisher`, or a stand-in in the unit tests."""

    produced: int
    failed: int
    outcomes: Outcomes

    @property
    def in_flight(self) -> int: ...

    async def connect(self) -> None: ...

    async def open(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, row: Row, *, stall_s: float) -> bool: ...

    async def finish(self, *, stall_s: float, progress: Progress | None = None) -> bool: ...


class Publisher:
    """Produces the deposits (acks=all, idempotent, each on its account's shard) and,
    when waiting, reads the events topic from its end as of before the first record,
    into a `Matcher`."""

    def __init__(self, settings: Settings, *, wait: bool, window: int = in_flight_max) -> None:
        self.bootstrap = settings.kafka_bootstrap
        self.partitions = settings.partitions
        self.topics: Topics = deployment_topics(settings)
        self.wait = wait
        self.window = window
        self.matcher = Matcher()
        self.outcomes = self.matcher.outcomes
        self.produced = 0
        self.acked = 0
        self.failed = 0
        self._changed = asyncio.Event()
        self._last_change = time.monotonic()
        self._producer: Any = None
        self._consumer: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Reach Kafka: before the source is read, so that an unreachable one fails fast."""
        async with self._kafka():
            producer = durable_producer(
                self.bootstrap,
                linger_ms=5,
                max_batch_size=512 * 1024,
            )
            await _started(producer)
            self._producer = producer

    async def open(self) -> None:
        """The deployment's topics and the results reader, just before producing."""
        async with self._kafka():
            # The engine may never have run on this prefix: producing to a missing
            # topic would let the broker create it with its default partition count.
            await ensure_topics(self.bootstrap, self.topics.all())
            if self.wait:
                await self._start_reader()

    @contextlib.asynccontextmanager
    async def _kafka(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(connect_timeout_s):
                yield
        except TopicMismatch as exc:
            raise ImportFailed(str(exc)) from None
        except TimeoutError:  # before OSError, of which it is one
            raise ImportFailed(
                f"Kafka unreachable at {self.bootstrap}: no answer in {connect_timeout_s:.0f}s"
            ) from None
        except (KafkaError, OSError) as exc:
            raise ImportFailed(f"Kafka unreachable at {self.bootstrap}: {one_line(exc)}") from None

    async def _start_reader(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await _started(consumer)
        self._consumer = consumer
        tps = [TopicPartition(self.topics.events.name, p) for p in range(self.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the lazy seek now, before anything is produced
            await consumer.position(tp)
        self._reader = asyncio.create_task(self._read(), name="import-results")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    @property
    def in_flight(self) -> int:
        """Produced and not answered yet (not waiting: not acknowledged yet)."""
        return len(self.matcher) if self.wait else self.produced - self.acked - self.failed

    async def send(self, row: Row, *, stall_s: float) -> bool:
        """Produce one row once the window has room; False if it stayed full `stall_s`."""
        if not await self._until(lambda: self.in_flight < self.window, stall_s):
            return False
        if self.wait:
            self.matcher.expect(row)
        try:
            future = await self._producer.send(
                self.topics.commands.name,
                key=row.account.encode(),
                value=encode(row.command()),
                partition=shard_of(row.account, self.partitions),
            )
        except KafkaError as exc:
            raise ImportFailed(
                f"Kafka failed after {self.produced:,} deposits were produced: "
                f"{one_line(exc)} (re-running the import is safe)"
            ) from None
        self.produced += 1
        future.add_done_callback(lambda f: self._acknowledged(row, f))
        return True

    async def finish(self, *, stall_s: float, progress: Progress | None = None) -> bool:
        """Wait for every acknowledgement, then (when waiting) every result; False if
        `stall_s` passed without one."""
        # Failed sends are counted by their callbacks.
        with contextlib.suppress(KafkaError, TimeoutError):
            await asyncio.wait_for(self._producer.flush(), flush_timeout_s)
        await asyncio.sleep(0)  # the acknowledgements' callbacks

        def done() -> bool:
            if progress is not None:
                progress.add(self.outcomes.answered - progress.done)
            return self.in_flight == 0

        return await self._until(done, stall_s)

    async def _until(self, ready: Callable[[], bool], stall_s: float) -> bool:
        """Wait until `ready()`, as long as something (an acknowledgement, a result)
        happens at least every `stall_s` seconds."""
        self._last_change = time.monotonic()
        while not ready():
            if self._reader is not None and self._reader.done():
                self._reader.result()  # a reader that died says why, not "no result came"
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(stall_s, 1.0))
            except TimeoutError:
                if time.monotonic() - self._last_change >= stall_s:
                    return ready()
        return True

    def _touch(self) -> None:
        self._last_change = time.monotonic()
        self._changed.set()

    def _acknowledged(self, row: Row, future: asyncio.Future[Any]) -> None:
        self._touch()
        if future.cancelled() or future.exception() is not None:
            self.failed += 1
            self.matcher.failed(row)
            return
        self.acked += 1
        meta = future.result()
        self.matcher.acknowledged(row, meta.partition, meta.offset)

    async def _read(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(
                    timeout_ms=poll_timeout_ms, max_records=self.window
                )
            except KafkaError:
                # The consumer reconnects by itself; a long outage ends as a stall.
                log.warning("reading results failed; retrying", exc_info=True)
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                for record in records:
                    self.matcher.offer(record.value or b"", source_in(record.headers))
            if batches:
                self._touch()
