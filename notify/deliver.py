"""One subscription's deliveries: read the events topic, POST each matching result event
to the subscriber, retry until it is acknowledged or the horizon passes, and store how
far everything is done.

Each running subscription has its own reader (a group-less consumer of the partitions
the notifier's group gave this process), so a slow or dead subscriber only ever holds
up itself: its bounded lane queues fill, its reader waits, nothing else does.

Order and concurrency. An event goes to one of `concurrency` lanes chosen by its
account; a lane delivers one event at a time, retries included, so one account's
deliveries reach the subscriber in the order the engine decided them, and at most
`concurrency` requests per subscriber are in flight.

Progress (at-least-once, repeating only what is in flight). An event is done when it
is acknowledged (2xx), parked as failed after the horizon, or not matching the filter.
Two records in PostgreSQL say what is done:
- per lane and partition, the offset of the last event the lane has done
  (`notify.lanes`, subscription_lanes), stored before the lane sends its next event,
  the writes of the process's lanes grouped into one statement;
- per partition, the watermark `next_offset`: the first offset not yet done (the
  slowest lane holds it back), stored every `progress_ms` and when the reader stops.
The order of the commit, per event: deliver (or park) -> store the lane's done offset
-> mark done -> advance the watermark past contiguous done offsets -> (every
`progress_ms`) store the watermark. A notifier killed with -9 reads again from the
watermark and skips every event at or below its lane's stored done offset (a lane
delivers its events of a partition in offset order: all of those are done), so it
skips nothing undone and repeats at most one event per lane: the one in flight, sent
and not yet stored as done. Lane offsets are of a lane count: after a change of
`concurrency` only the watermark counts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from notify import rules, store
from notify.lanes import LaneLog
from notify.metrics import Metrics
from topics.codec import decode_result
from topics.schema import Result

log = logging.getLogger(__name__)

_json = msgspec.json.Encoder()
RESPONSE_READ_MAX = 64 * 1024  # of a subscriber's answer body: it is not used
# Records from before the subscription's creation by at most this much may hold events
# decided after it (the broker's timestamp is the producer's clock).
START_MARGIN_MS = 60_000


@dataclass(frozen=True, kw_only=True)
class Config:
    timeout_s: float
    backoff_first_s: float
    backoff_max_s: float
    horizon_s: float
    concurrency: int
    queue_max: int
    progress_s: float


@dataclass(frozen=True)
class Item:
    partition: int
    offset: int
    result: Result


class Progress:
    """Per partition: offsets read and not done yet, in read order, and the watermark."""

    def __init__(self, start: dict[int, int]) -> None:
        self.read_to = dict(start)  # partition -> next offset to read
        self.open: dict[int, collections.deque[int]] = {p: collections.deque() for p in start}
        self.done: dict[int, set[int]] = {p: set() for p in start}
        self.stored = dict(start)

    def read(self, partition: int, offset: int, *, pending: bool) -> None:
        if pending:
            self.open[partition].append(offset)
        self.read_to[partition] = offset + 1

    def finish(self, partition: int, offset: int) -> None:
        self.done[partition].add(offset)
        waiting, done = self.open[partition], self.done[partition]
        while waiting and waiting[0] in done:
            done.discard(waiting.popleft())

    def watermarks(self) -> dict[int, int]:
        return {p: (q[0] if q else self.read_to[p]) for p, q in self.open.items()}

    def changed(self) -> dict[int, int]:
        marks = self.watermarks()
        return {p: o for p, o in marks.items() if o > self.stored.get(p, -1)}


class Reader:
    def __init__(
        self,
        sub: store.Subscription,
        *,
        bootstrap: str,
        topic: str,
        partitions: list[int],
        pool: Any,
        http: aiohttp.ClientSession,
        metrics: Metrics,
        config: Config,
        lane_log: LaneLog,
    ) -> None:
        self.sub = sub
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = sorted(partitions)
        self.pool = pool
        self.http = http
        self.metrics = metrics
        self.config = config
        self.secret = sub.secret.encode()
        self.rng = random.Random()
        self.progress: Progress | None = None
        self.lanes_done: dict[tuple[int, int], int] = {}  # stored at this reader's start
        self.lane_log = lane_log
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"notify {self.sub.id}")
        self.task.add_done_callback(self._ended)

    def failed(self) -> bool:
        """Ended by an error (the notifier starts it again)."""
        task = self.task
        return task is not None and task.done() and not task.cancelled() and bool(task.exception())

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("notify %s: reader failed (%r)", self.sub.id, task.exception())

    async def stop(self) -> None:
        """Stop reading and delivering, and store what is done (in-flight deliveries are
        repeated by the next reader)."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._store_progress()

    def watermarks(self) -> dict[int, int]:
        return self.progress.watermarks() if self.progress is not None else {}

    async def _run(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        lanes: list[asyncio.Queue[Item]] = [
            asyncio.Queue(maxsize=self.config.queue_max) for _ in range(self.config.concurrency)
        ]
        tasks = [asyncio.create_task(self._lane(i, q)) for i, q in enumerate(lanes)]
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in self.partitions]
            consumer.assign(tps)
            start = await self._start_offsets(consumer, tps)
            self.lanes_done = await self._lanes_done()
            self.progress = Progress(start)
            log.info(
                "notify %s: reading %s from offsets %s (%d lane positions stored)",
                self.sub.id, self.topic, start, len(self.lanes_done),
            )  # fmt: skip
            for tp in tps:
                consumer.seek(tp, start[tp.partition])
            tasks.append(asyncio.create_task(self._keep_progress()))
            while not await self._at_end(consumer, tps):
                polled = await consumer.getmany(timeout_ms=500, max_records=500)
                for tp, records in sorted(polled.items(), key=lambda kv: kv[0].partition):
                    for record in records:
                        await self._route(lanes, tp.partition, record)
                    self.metrics.read.inc(len(records))
                # A partition's position moves past transaction markers: so does its mark.
                for tp in tps:
                    position = await consumer.position(tp)
                    progress = self.progress
                    if (
                        not progress.open[tp.partition]
                        and position > progress.read_to[tp.partition]
                    ):
                        progress.read_to[tp.partition] = position
            await asyncio.gather(*(q.join() for q in lanes))  # a bounded read: all done
            await self._finished()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _start_offsets(
        self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]
    ) -> dict[int, int]:
        """The stored progress; for a partition without, the first record at most
        START_MARGIN_MS older than the subscription (or the beginning)."""
        stored = await store.progress(self.pool, self.sub.id, self.topic)
        missing = [tp for tp in tps if tp.partition not in stored]
        if missing:
            since = max(0, self.sub.created_at_ms - START_MARGIN_MS)
            found = await consumer.offsets_for_times({tp: since for tp in missing})
            # No hit: from the beginning, not the end (the end a read_committed consumer
            # sees can pass records of a transaction committed meanwhile). Old records
            # are read once and filtered out by their time.
            firsts = await consumer.beginning_offsets(missing)
            for tp in missing:
                hit = found.get(tp)
                stored[tp.partition] = hit.offset if hit is not None else firsts[tp]
        return {tp.partition: stored[tp.partition] for tp in tps}

    async def _route(self, lanes: list[asyncio.Queue[Item]], partition: int, record: Any) -> None:
        assert self.progress is not None
        try:
            result = decode_result(record.value or b"")
        except msgspec.MsgspecError:
            # The sinks dead-letter it; it is no result anybody could be told about.
            self.progress.read(partition, record.offset, pending=False)
            return
        lane = rules.lane_of(result.account, len(lanes))
        # Not wanted either when done before a crash or a stop: its lane has stored that.
        done = record.offset <= self.lanes_done.get((partition, lane), -1)
        wanted = not done and self._wanted(result)
        self.progress.read(partition, record.offset, pending=wanted)
        if wanted:
            # Waits while this subscriber's lane is full: only this reader is held up.
            await lanes[lane].put(Item(partition, record.offset, result))

    def _wanted(self, result: Result) -> bool:
        return result.at_ms >= self.sub.created_at_ms and self.sub.filter.matches(
            result.account, result.status, result.kind
        )

    async def _at_end(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> bool:
        return False  # a subscription follows the topic for ever

    async def _finished(self) -> None:
        return None

    async def _lane(self, lane: int, queue: asyncio.Queue[Item]) -> None:
        while True:
            item = await queue.get()
            await self._deliver(item)
            await self._lane_done(item.partition, lane, item.offset)
            assert self.progress is not None
            self.progress.finish(item.partition, item.offset)
            queue.task_done()

    async def _keep_progress(self) -> None:
        while True:
            await asyncio.sleep(self.config.progress_s)
            try:
                await self._store_progress()
            except (OSError, TimeoutError, Exception) as exc:  # stored again next time
                log.warning("notify %s: cannot store progress (%s)", self.sub.id, exc)

    async def _lanes_done(self) -> dict[tuple[int, int], int]:
        stored = await store.lanes_done(self.pool, self.sub.id, self.topic, self.config.concurrency)
        return {k: o for k, o in stored.items() if k[0] in self.partitions}

    async def _lane_done(self, partition: int, lane: int, offset: int) -> None:
        await self.lane_log.done((self.sub.id, partition, lane), offset)

    async def _store_progress(self) -> None:
        if self.progress is None:
            return
        changed = self.progress.changed()
        if changed:
            await store.save_progress(self.pool, self.sub.id, self.topic, changed)
            self.progress.stored.update(changed)

    def _body(self, item: Item, delivery: str) -> bytes:
        return _json.encode(
            {
                "delivery_id": delivery,
                "subscription_id": self.sub.id,
                "topic": self.topic,
                "partition": item.partition,
                "offset": item.offset,
                "command_id": item.result.command_id,
                "event": item.result,
            }
        )

    async def _deliver(self, item: Item) -> None:
        """POST until a 2xx, or park after the horizon."""
        delivery = rules.delivery_id(self.sub.id, self.topic, item.partition, item.offset)
        body = self._body(item, delivery)
        first = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            error = await self._attempt(delivery, item, body)
            if error is None:
                self.metrics.deliveries.labels("acknowledged").inc()
                lag_s = max(0.0, time.time() - item.result.at_ms / 1000)
                self.metrics.latency.observe(lag_s)
                return
            wait_s = rules.backoff_s(
                attempt,
                first_s=self.config.backoff_first_s,
                max_s=self.config.backoff_max_s,
                rng=self.rng,
            )
            if time.monotonic() - first + wait_s > self.config.horizon_s:
                await self._park(delivery, item, attempt, error)
                return
            self.metrics.retries.inc()
            await asyncio.sleep(wait_s)

    async def _attempt(self, delivery: str, item: Item, body: bytes) -> str | None:
        """One POST; None when acknowledged, else what went wrong."""
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            rules.DELIVERY_ID: delivery,
            rules.SUBSCRIPTION_ID: self.sub.id,
            rules.COMMAND_ID: item.result.command_id,
            rules.TIMESTAMP: str(timestamp),
            rules.SIGNATURE: rules.signature(self.secret, timestamp, delivery, self.sub.id, body),
        }
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        try:
            async with self.http.post(
                self.sub.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                await response.content.read(RESPONSE_READ_MAX)
                status = response.status
        except TimeoutError:
            self.metrics.attempts.labels("timeout").inc()
            return "timeout"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self.metrics.attempts.labels("connection").inc()
            return f"connection: {type(exc).__name__}: {exc}"[:300]
        except Exception as exc:  # a bug of ours or aiohttp's must not stop the lane
            log.exception("notify %s: delivery %s raised", self.sub.id, delivery)
            self.metrics.attempts.labels("connection").inc()
            return f"error: {type(exc).__name__}"
        if 200 <= status < 300:
            self.metrics.attempts.labels("2xx").inc()
            return None
        self.metrics.attempts.labels("status").inc()
        return f"HTTP {status}"

    async def _park(self, delivery: str, item: Item, attempts: int, error: str) -> None:
        """Stored as failed (retried until PostgreSQL takes it: parking is what lets the
        watermark pass this event)."""
        row = {
            "delivery_id": delivery,
            "topic": self.topic,
            "partition": item.partition,
            "offset": item.offset,
            "command_id": item.result.command_id,
            "account": item.result.account,
            "attempts": attempts,
            "last_error": error,
            "at_ms": int(time.time() * 1000),
        }
        delay = 0.2
        while True:
            try:
                await store.park(self.pool, self.sub.id, row)
                break
            except Exception as exc:
                log.warning("notify %s: cannot park %s (%s); retrying", self.sub.id, delivery, exc)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
        self.metrics.deliveries.labels("failed").inc()
        log.warning(
            "notify %s: delivery %s (command %s) failed after %d attempts: %s",
            self.sub.id, delivery, item.result.command_id, attempts, error,
        )  # fmt: skip


class Redelivery(Reader):
    """A redelivery on request: the subscription's matching events decided within
    [from_ms, to_ms], read once from the topic and delivered again (same delivery ids:
    the same events), then marked done. No progress is stored (neither the watermark nor
    the lanes' done offsets, which are the subscription's): a notifier that stops in
    between starts the whole window again (at-least-once)."""

    def __init__(self, sub: store.Subscription, redelivery: store.Redelivery, **kw: Any) -> None:
        super().__init__(sub, **kw)
        self.redelivery = redelivery
        self.ends: dict[int, int] = {}

    def _wanted(self, result: Result) -> bool:
        r = self.redelivery
        within = r.from_ms <= result.at_ms <= r.to_ms
        return within and self.sub.filter.matches(result.account, result.status, result.kind)

    async def _start_offsets(
        self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]
    ) -> dict[int, int]:
        r = self.redelivery
        firsts = await consumer.beginning_offsets(tps)
        lasts = await consumer.end_offsets(tps)
        begin = await consumer.offsets_for_times(
            {tp: max(0, r.from_ms - START_MARGIN_MS) for tp in tps}
        )
        end = await consumer.offsets_for_times({tp: r.to_ms + START_MARGIN_MS for tp in tps})
        for tp in tps:
            hit = end.get(tp)
            self.ends[tp.partition] = hit.offset if hit is not None else lasts[tp]
        out = {}
        for tp in tps:
            hit = begin.get(tp)
            out[tp.partition] = hit.offset if hit is not None else firsts[tp]
        return out

    async def _at_end(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> bool:
        done = True
        for tp in tps:
            if await consumer.position(tp) >= self.ends.get(tp.partition, 0):
                consumer.pause(tp)
            else:
                done = False
        return done

    async def _route(self, lanes: list[asyncio.Queue[Item]], partition: int, record: Any) -> None:
        if record.offset < self.ends.get(partition, 0):
            await super()._route(lanes, partition, record)

    async def _store_progress(self) -> None:
        return None

    async def _lanes_done(self) -> dict[tuple[int, int], int]:
        return {}  # everything in the window again

    async def _lane_done(self, partition: int, lane: int, offset: int) -> None:
        return None

    async def _finished(self) -> None:
        await store.finish_redelivery(self.pool, self.redelivery.id)
        log.info("notify %s: redelivery %s done", self.sub.id, self.redelivery.id)
