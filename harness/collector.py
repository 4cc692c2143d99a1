"""Read result events and dead letters back from Kafka, and check them against each other.

Used by the demo, the benchmark and the integration tests: it is how anything outside
the engine learns what the engine decided, so it reads committed records only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from streams import kafka_internals
from topics.codec import decode_dead_letter, decode_result
from topics.ids import credit_id, refund_id
from topics.schema import DeadLetter, Result, Status, source_in
from topics.specs import Topics

poll_timeout_ms = 200
poll_records_max = 10_000
outage_pause_s = 0.5


@dataclass
class Results:
    """Everything read so far, indexed the ways the checks need."""

    by_id: dict[str, list[Result]] = field(default_factory=lambda: defaultdict(list))
    dead_letters: list[DeadLetter] = field(default_factory=list)
    received_at: dict[str, float] = field(default_factory=dict)
    # When a result naming each commands record (its `tally-source` header) was first
    # read: the per-record clock of harness.waits when command ids repeat.
    heard_at: dict[bytes, float] = field(default_factory=dict)
    last_at: float = 0.0
    count: int = 0
    foreign: int = 0

    def add(self, result: Result, found: bytes | None = None) -> None:
        """A result read, with the commands record its `tally-source` header names."""
        now = time.monotonic()
        self.by_id[result.command_id].append(result)
        self.received_at.setdefault(result.command_id, now)
        if found is not None:
            self.heard_at.setdefault(found, now)
        self.last_at = now
        self.count += 1

    def statuses(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for results in self.by_id.values():
            for r in results:
                out[
                    r.status.value if r.reason is None else f"{r.status.value}:{r.reason.value}"
                ] += 1
        return out

    def pending_internal(self) -> list[str]:
        """Ids of internal commands the results imply (credits, refunds) not yet answered."""
        return [
            implied
            for results in list(self.by_id.values())
            for r in results
            for implied in implied_ids(r)
            if implied not in self.by_id
        ]


def implied_ids(result: Result) -> list[str]:
    """The ids of the internal commands an outcome sent (see `Result.emitted`)."""
    if not result.emitted or result.status is Status.DUPLICATE:
        return []
    if result.kind == "disburse":
        return [credit_id(result.account, result.command_id, i) for i in range(result.emitted)]
    if result.kind == "credit":
        return [refund_id(result.command_id)]
    return [credit_id(result.account, result.command_id)]


class Collector:
    """Consumes the events and dead-letter topics from given offsets into `Results`.

    With `outlast_outages`, a Kafka error of the reader (the broker restarted under it,
    as the chaos run does) is waited out and the reading goes on; without, it ends the
    reader and `wait_for` raises it."""

    def __init__(self, bootstrap: str, topics: Topics, *, outlast_outages: bool = False) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.outlast_outages = outlast_outages
        self.outages = 0
        self.results = Results()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, *, from_end: bool = True) -> None:
        """Start reading; with `from_end` only what is produced from now on."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        # In a fetch session, as the engine reads (`streams.fetch_session`): the reader
        # shares the machine with what it measures, and at 64 partitions each of its full
        # fetches listed 128 mostly idle partitions (the bench process used 0.33-0.39 of
        # a core at the paced 200 commands/s there, 0.25 at 8 partitions).
        kafka_internals.use_fetch_sessions(consumer)
        tps = [
            TopicPartition(spec.name, p)
            for spec in (self.topics.events, self.topics.dead_letter)
            for p in range(spec.partitions)
        ]
        consumer.assign(tps)
        # Explicit offsets, resolved now (before anything is produced): a lazy
        # seek_to_beginning right after assign() can lose to the reset the assignment
        # itself started (see `read_all`).
        starts = await (consumer.end_offsets if from_end else consumer.beginning_offsets)(tps)
        for tp, offset in starts.items():
            consumer.seek(tp, offset)
        self._consumer = consumer
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        events = self.topics.events.name
        while True:
            try:
                batches = await self._consumer.getmany(
                    timeout_ms=poll_timeout_ms, max_records=poll_records_max
                )
            except KafkaError:
                if not self.outlast_outages:
                    raise
                self.outages += 1
                await asyncio.sleep(outage_pause_s)
                continue
            for tp, records in batches.items():
                for record in records:
                    try:
                        if tp.topic == events:
                            result = decode_result(record.value or b"")
                            self.results.add(result, source_in(record.headers))
                        else:
                            letter = decode_dead_letter(record.value or b"")
                            self.results.dead_letters.append(letter)
                    except msgspec.MsgspecError:
                        # Not the engine's (a test's poison record, say): counted.
                        self.results.foreign += 1

    async def wait_for(
        self, done: Callable[[Results], bool], *, timeout_s: float, say: Callable[[str], None]
    ) -> bool:
        """Wait until `done(results)` holds; report progress every few seconds."""
        deadline = time.monotonic() + timeout_s
        next_report = time.monotonic() + 5
        while not done(self.results):
            if self._task is not None and self._task.done():
                self._task.result()  # surfaces the reader's exception
            if time.monotonic() > deadline:
                return False
            if time.monotonic() > next_report:
                say(f"  ... {self.results.count} results so far")
                next_report += 5
            await asyncio.sleep(0.1)
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


def expected_counts(ids: Iterable[str | None]) -> Counter[str]:
    """How many results each command id should get: one per record carrying it."""
    return Counter(i for i in ids if i is not None)


def all_answered(expected: Mapping[str, int]) -> Callable[[Results], bool]:
    def done(results: Results) -> bool:
        return all(len(results.by_id.get(i, ())) >= n for i, n in expected.items())

    return done


async def read_all(
    bootstrap: str, topic: str, partitions: int, *, timeout_s: float = 120.0
) -> tuple[list[Any], dict[int, int]]:
    """Every committed record of `topic` from its beginning to the end offsets taken at
    the start, and those end offsets per partition. Done when the consumer's position
    reaches them (it moves past transaction markers and compacted-away offsets)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        # Should the assignment's own reset still win over the seek below, it goes to the
        # beginning too, not to the end: a partition read from its end was seen missing
        # its one record (tests/integration/test_trust.py, once in a full run).
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        # Explicit offsets: right after assign() a lazy seek_to_beginning can lose to
        # the reset the assignment itself started (seen: positions at the end).
        for tp, first in (await consumer.beginning_offsets(tps)).items():
            consumer.seek(tp, first)
        # By (partition, offset): a reset that lands after records were read reads them
        # again, and each is kept once.
        out: dict[tuple[int, int], Any] = {}
        deadline = time.monotonic() + timeout_s
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} back did not reach its end in {timeout_s}s")
            polled = await consumer.getmany(timeout_ms=500, max_records=20_000)
            for tp, records in polled.items():
                for r in records:
                    if r.offset < ends[tp]:
                        out.setdefault((tp.partition, r.offset), r)
        return list(out.values()), {tp.partition: end for tp, end in ends.items()}
    finally:
        await consumer.stop()
