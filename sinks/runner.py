"""The loop every sink shares: consume the events topic in batches, hand each batch to a
store, commit, and never skip or half-write anything.

A batch is up to `batch_size` events or whatever arrived within `linger_ms` of its first
one. The store writes it idempotently (replaying a batch changes nothing) together with
the offsets it reached (PostgreSQL in the batch's transaction, Redis in each partition's
script call); whenever partitions are assigned the sink resumes from the store's own
offsets, so a crash repeats nothing the store has. Kafka offsets are committed after each
batch too, only so that the group's lag can be monitored.

A store that is down (connection refused, restarting) is retried with exponential
backoff and full jitter, on the same batch, until it answers; the sink logs once when
it goes down and once when it is back, not once per retry. An event that cannot be
decoded, or breaks a bound of the schema (`topics.schema.Result`), goes to the
dead-letter topic and the sink goes on.

No event's content stops a sink either. When the store refuses a batch with an error
its content caused (`content_error`: a value PostgreSQL cannot hold, a Redis script
error; told apart from outages, which are retried), the batch is split in halves, and
halves again, each part written on its own (`sinks.isolate`), until the events the store
refuses are found alone; they are dead-lettered with the store's error and the rest of
the batch is in the store. Parts move no offsets (each is written with the offsets
the batch started from); the batch's end offsets are written last, after the dead
letters are sent, so a crash in between repeats the batch, never skips an event. Parts
are written in the batch's order, so balances still only move forward.

A store can also lose what it had (Redis flushed or restarted empty). The store notices
when it writes (`StoreLost`), and the loop looks for it every
`probe_every_s` too (stored offsets behind what was written, for partitions that are
quiet); either way every assigned partition is read again from the store's offsets, so
the store is rebuilt from the events topic while the sink runs.

The same loop replays (`until`): given partitions from their beginning up to fixed end
offsets, with no consumer group, nothing committed to Kafka and no dead letter sent
again (the live sink sent it when it first read the event), then it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

from sinks import intake, isolate
from sinks.batch import Batch, Store, StoreLost, no_content_errors, one_line
from sinks.retry import Outages
from topics.codec import encode
from topics.producer import durable_producer
from topics.schema import DeadLetter
from topics.specs import Topics

# What the stores and the tools import from here.
__all__ = ["Batch", "SinkRunner", "Store", "StoreLost"]

log = logging.getLogger(__name__)

status_every_s = 10.0
probe_every_s = 5.0


class SinkRunner:
    def __init__(
        self,
        store: Store,
        *,
        bootstrap: str,
        topics: Topics,
        group_id: str | None,
        batch_size: int = 5000,
        linger_ms: int = 200,
        partitions: list[int] | None = None,
        until: dict[int, int] | None = None,
        content_error: Callable[[BaseException], bool] = no_content_errors,
    ) -> None:
        self.store = store
        # Whether an error of store.write was caused by an event's content (the event is
        # isolated and dead-lettered) rather than by the store being unwell.
        self.content_error = content_error
        self.bootstrap = bootstrap
        self.topics = topics
        self.topic = topics.events.name
        self.group_id = group_id
        self.batch_size = batch_size
        self.linger_s = linger_ms / 1000
        # None: partitions come from the consumer group. A list: exactly these, assigned
        # by the caller (the processes of one `tally sink --processes N` split them).
        self.partitions = partitions
        # None: follow the topic for ever. partition -> end offset: a replay of
        # `partitions` from their beginning up to (excluding) these offsets, then stop.
        if until is not None and (partitions is None or group_id is not None):
            raise ValueError("a replay assigns its partitions itself and joins no group")
        self.until = until
        self.written_events = 0
        self.written_entries = 0
        self.batches = 0
        self.dead_lettered = 0
        self.isolated = 0  # of them: events the store refused
        self.rebuilds = 0
        self._next_probe = 0.0
        self.consumer: AIOKafkaConsumer | None = None
        self.on_batch: Callable[[Batch], None] | None = None
        # Called with each batch's write time in seconds (retries of an outage included):
        # the sink's web server keeps the histogram.
        self.on_write: Callable[[float], None] | None = None
        self._stopping = asyncio.Event()
        self._outages = Outages(self._stopping)
        self._reseek: set[TopicPartition] = set()
        self._next: dict[TopicPartition, int] = {}
        self._lettered: dict[int, int] = {}  # partition -> offset dead letters were sent to
        self._isolated_to: dict[int, int] = {}  # the same, for events the store refused
        self._producer: Any = None
        self._pending: tuple[Batch, asyncio.Task[None]] | None = None
        self._last_status = 0.0

    def stop(self) -> None:
        self._stopping.set()

    @property
    def down_since(self) -> float | None:
        """Since when (monotonic) the store is unreachable; None while it answers."""
        return self._outages.down_since

    @down_since.setter
    def down_since(self, at: float | None) -> None:
        self._outages.down_since = at

    @property
    def outages(self) -> int:
        """How many times the store went down."""
        return self._outages.count

    async def lag(self) -> int:
        """Events on the topic not yet consumed, over the assigned partitions. (The
        consumer's position moves past transaction markers; our own offsets do not.)"""
        consumer = self.consumer
        if consumer is None:
            return 0
        total = 0
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                total += max(0, high - await consumer.position(tp))
        return total

    async def partition_lag(self) -> dict[int, int]:
        """Events not yet consumed per assigned partition (those whose end is known)."""
        consumer = self.consumer
        if consumer is None:
            return {}
        lags = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                lags[tp.partition] = max(0, high - await consumer.position(tp))
        return lags

    def assigned(self) -> list[int]:
        """The partitions this sink consumes now (empty before the group assigns any)."""
        if self.consumer is None:
            return []
        return sorted(tp.partition for tp in self.consumer.assignment())

    async def run(self) -> None:
        producer = self._producer = durable_producer(self.bootstrap)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            # A store outage holds the loop on one batch; stay in the group meanwhile.
            max_poll_interval_ms=900_000,
        )
        if self.partitions is None:
            self.consumer.subscribe([self.topic], listener=_Listener(self))
        else:
            tps = [TopicPartition(self.topic, p) for p in self.partitions]
            self.consumer.assign(tps)
            self._reseek = set(tps)
        await self._retrying(self.store.open)
        await producer.start()
        await self.consumer.start()
        self._last_status = time.monotonic()
        try:
            while not self._stopping.is_set():
                polled = await self._poll()
                if self._reseek:
                    await self._finish()
                    await self._seek_to_store()
                    continue  # what was polled came from before the seek
                batch, letters = self._decode(polled)
                await self._send_letters(letters, self._lettered)
                # One write in flight: batch N is written while batch N+1 is polled and
                # decoded. Writes stay in order; N is committed before N+1 is written.
                await self._finish()
                if self._reseek:
                    continue  # the store lost data: everything is read again
                if batch.offsets:
                    batch.start = {
                        p: self._next.get(TopicPartition(self.topic, p), 0) for p in batch.offsets
                    }
                    self._pending = (batch, asyncio.create_task(self._write(batch)))
                elif self.until is None:
                    await self._probe()
                if self.until is not None and await self._at_end():
                    break
            await self._finish()
        finally:
            if self._pending is not None:
                self._pending[1].cancel()
                await asyncio.gather(self._pending[1], return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            with contextlib.suppress(Exception):
                await producer.stop()
            await self.store.close()

    async def _send_letters(self, letters: list[DeadLetter], sent_to: dict[int, int]) -> None:
        """Dead letters to the dead-letter topic, each once: `sent_to` (partition -> next
        offset) skips those sent when the event was first read (it is read again after a
        rebuild). A replay sends none (the live sink did)."""
        if self.until is not None:
            return
        for letter in letters:
            p = letter.source_partition
            if letter.source_offset < sent_to.get(p, 0):
                continue
            await self._producer.send_and_wait(
                self.topics.dead_letter.name, encode(letter), partition=p
            )
            sent_to[p] = letter.source_offset + 1

    async def _write(self, batch: Batch) -> None:
        """Write one batch (retrying while the store is down); it is visible from here.
        Events whose content the store refuses are isolated and dead-lettered."""
        started = time.perf_counter()
        try:
            await self._retrying(lambda: self.store.write(batch))
        except Exception as error:
            if not self.content_error(error):
                raise
            batch = await self._without_refused(batch, error)
        if self.on_write is not None:
            self.on_write(time.perf_counter() - started)
        self.batches += 1
        self.written_events += len(batch.events)
        self.written_entries += batch.entries
        if self.on_batch is not None:
            self.on_batch(batch)

    async def _without_refused(self, batch: Batch, error: BaseException) -> Batch:
        """The store refused `batch` for its content: find the events it refuses, write
        every other one, dead-letter those, then move the offsets. Returns the batch as
        written (without the refused events)."""
        log.warning(
            "sink %s: the store refused a batch of %d events (%s); isolating the events "
            "it cannot hold",
            self.store.name,
            len(batch.events),
            one_line(error),
        )
        assert len(batch.sources) == len(batch.events), "a batch names each event's offset"
        refused = await isolate.refused_events(
            self._write_retrying, self.content_error, batch, error
        )
        letters = [
            intake.refused(
                self.store.name, self.topic, batch.events[i][0], batch.sources[i],
                batch.events[i][1], why,
            )
            for i, why in refused
        ]  # fmt: skip
        self.isolated += len(letters)
        self.dead_lettered += len(letters)
        await self._send_letters(letters, self._isolated_to)
        # Every other event is in the store now (in the parts): only the offsets are left.
        await self._write_retrying(dataclasses.replace(batch, events=[], sources=[]))
        return isolate.without(batch, refused)

    async def _write_retrying(self, batch: Batch) -> None:
        await self._retrying(lambda: self.store.write(batch))

    async def _finish(self) -> None:
        """Wait for the write in flight, then commit its offsets and count it."""
        if self._pending is None:
            return
        batch, write = self._pending
        try:
            await write
        except StoreLost as lost:
            self._lost(lost.partitions)
            return
        finally:
            self._pending = None
        assert self.consumer is not None
        if self.group_id is not None:
            with contextlib.suppress(Exception):
                # Failing here (a rebalance) only means the next owner repeats this batch,
                # which the stores absorb.
                await self.consumer.commit(
                    {TopicPartition(self.topic, p): o for p, o in batch.offsets.items()}
                )
        for p, o in batch.offsets.items():
            self._next[TopicPartition(self.topic, p)] = o
        await self._status()

    async def _status(self) -> None:
        """Every status_every_s: one line with what was written and the lag."""
        now = time.monotonic()
        if now - self._last_status >= status_every_s:
            self._last_status = now
            log.info(
                "sink %s: %d events, %d entries written, lag %d",
                self.store.name,
                self.written_events,
                self.written_entries,
                await self.lag(),
            )

    def _lost(self, partitions: list[int]) -> None:
        """The store lost what was written: read every assigned partition again from the
        store's own offsets (those it lost start over from the beginning). Nothing of the
        batch in hand is committed; what was already polled is dropped and read again."""
        assert self.consumer is not None
        self.rebuilds += 1
        log.warning(
            "sink %s: the store lost its data for partitions %s; rebuilding it from "
            "the events topic",
            self.store.name,
            sorted(partitions),
        )
        self._reseek |= set(self.consumer.assignment())

    async def _probe(self) -> None:
        """On a quiet loop, every probe_every_s: a store whose offsets are behind what
        this sink wrote has lost data that no new event would make it notice."""
        now = time.monotonic()
        if now < self._next_probe or self._pending is not None:
            return
        self._next_probe = now + probe_every_s
        try:
            stored = await self.store.offsets(self.topic)
        except self.store.unavailable:
            return  # the next write waits for it
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        behind = [
            tp.partition
            for tp, written in self._next.items()
            if tp in assigned and written > 0 and stored.get(tp.partition, 0) < written
        ]
        if behind:
            self._lost(behind)

    async def _poll(self) -> dict[TopicPartition, list[Any]]:
        assert self.consumer is not None
        polled: dict[TopicPartition, list[Any]] = await self.consumer.getmany(
            timeout_ms=200, max_records=self.batch_size
        )
        count = sum(len(v) for v in polled.values())
        deadline = time.monotonic() + self.linger_s
        while count and count < self.batch_size and not self._reseek:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            more = await self.consumer.getmany(
                timeout_ms=int(remaining * 1000) + 1, max_records=self.batch_size - count
            )
            for tp, records in more.items():
                polled.setdefault(tp, []).extend(records)
                count += len(records)
        return polled

    def _decode(self, polled: dict[TopicPartition, list[Any]]) -> tuple[Batch, list[DeadLetter]]:
        batch, letters = intake.decode(
            polled, topic=self.topic, store_name=self.store.name, written=self._next,
            until=self.until,
        )  # fmt: skip
        self.dead_lettered += len(letters)
        return batch, letters

    async def _at_end(self) -> bool:
        """A replay: whether every partition has been read up to its end offset. (The
        position, not the last record: it moves past transaction markers.) A partition
        that has is paused, so that events produced since the start are not fetched."""
        assert self.consumer is not None and self.until is not None
        done = True
        for tp in self.consumer.assignment():
            if await self.consumer.position(tp) >= self.until.get(tp.partition, 0):
                self.consumer.pause(tp)
            else:
                done = False
        return done

    async def _seek_to_store(self) -> None:
        assert self.consumer is not None
        tps, self._reseek = self._reseek, set()
        if self.until is not None:
            for tp in tps:
                self._next.pop(tp, None)
                await self.consumer.seek_to_beginning(tp)
            return
        stored = await self._retrying(lambda: self.store.offsets(self.topic))
        assigned = self.consumer.assignment()
        for tp in tps:
            if tp not in assigned:
                continue
            offset = stored.get(tp.partition, 0)
            self._next[tp] = offset
            self.consumer.seek(tp, offset)

    async def _retrying(self, call: Callable[[], Any]) -> Any:
        """Run `call` until the store answers; log the outage once, and the recovery."""
        return await self._outages.retrying(self.store, call)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: SinkRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:
            self.runner._next.pop(tp, None)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # The seek happens in the loop, where a store outage can be waited out.
        self.runner._reseek |= set(assigned)
