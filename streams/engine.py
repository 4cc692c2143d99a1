"""The engine worker: consumes the commands and internal topics in one consumer group and
applies each shard's records in order, a batch at a time, in one Kafka transaction.

Per batch of shard p: every record is decoded and decided by `ledger.apply` against the
shard's `ShardStore`; the results go to partition p of the events topic, credits and
refunds to their payees' partitions of the internal topic, misplaced records to their
account's partition, garbage to the dead-letter topic, and every key the batch changed
to partition p of the changelog, once, with its last value. The consumed offsets are
added to the same transaction, which then commits. Only after the commit does the batch
reach the local RocksDB (with the changelog offset it reached, atomically). So the
outputs, the changelog and the consumed offsets of a batch are visible together or not
at all, and what a crash loses is re-read from Kafka: a retried record finds the state
exactly as it was before its first attempt.

Time. The time a command is decided at (what the idempotency window starts from, what a
hold's expiry is judged against, the result's `at_ms`) is the engine's own wall clock,
never a record's timestamp, which whoever produced the record may have chosen. Per
shard it never runs backwards: each batch's time is at least the previous batch's (a
clock stepped back by NTP holds the shard's time still until it catches up). That it is
a wall clock and not something re-derivable from the input is fine for recovery: the
engine's decisions are not re-derived on replay, they are recorded (in the changelog
and the results) by the transaction that made them; a batch that did not commit is
decided again, at a new time, as if it came for the first time.

The clock itself is checked against the broker's: every topic is LogAppendTime, so each
committed batch's last record comes back with the time the broker appended it.
While the last such check is older than a minute, or found the engine's clock more
than `clock_skew_max_ms` away from the broker's, idempotency records are not pruned: a
worker whose clock ran ahead would otherwise forget other workers' records early, and
their retries would apply twice. (Pruning is only storage hygiene; it can wait.)

Poison isolation: a batch that fails because of one of its records (an output over
limits.OUTPUT_BYTES_MAX, a record the broker refuses as too large or corrupt, an error
while deciding a record) is aborted and split in halves, each its own transaction, until
the record is alone; that record is then answered without its outputs (`rejected`
`record_too_large` if it names a command_id, else a bounded dead letter) and the records
behind it go on. Only a failure that is not about a record (the broker gone, a timeout,
fencing) takes the retry and take-over path, which re-reads the batch from Kafka.

Fencing: each shard has its own transactional producer, `transactional.id` =
`<group>-shard-<p>`. Whoever takes over a shard initialises that id first, which aborts
the previous owner's open transaction and fences it: a worker that was paused or cut off
can no longer commit anything for the shard. Only then is the shard's state caught up
from its changelog and its committed offsets read.

Why not Faust. faust-streaming 0.15 drove the first version of this engine. Under
`kill -9` its consumer committed offsets of records that had been fetched but never
handed to the agent (lost across the restart rebalance), so commands went without a
result; and its per-event dispatch capped the engine near 2,000 commands/s. This loop
keeps the same model (one owner per partition, RocksDB tables, compacted changelogs,
transactions) with the batch and the transaction boundaries in our hands.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import (
    CorruptRecordException,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from aiokafka.structs import TopicPartition

from core.progress import Progress
from core.settings import Settings
from streams import agreement, ledger
from streams.state import BalanceState
from streams.store import CommandName, ShardStore
from streams.watchdog import Watchdog
from topics import limits
from topics.codec import Invalid, Undecodable, dead_letter, decode_command, encode
from topics.names import changelog_name, deployment_topics, engine_group
from topics.producer import durable_producer
from topics.schema import (
    SOURCE_HEADER,
    Command,
    Expire,
    Hold,
    Reason,
    Result,
    Status,
    kind_of,
    source,
    source_in,
)
from topics.shard import shard_of
from topics.specs import Topics

log = logging.getLogger(__name__)

# One poll gathers up to this many records over every assigned partition; each shard's
# share is one transaction. Bigger batches amortise the transaction's round trips.
poll_max_records = 5000
poll_timeout_ms = 100
# How often due hold expiries and old idempotency records are looked for.
expiry_rescan_s = 30.0
prune_every_s = 10.0
prune_scan_per_shard = 5000
session_timeout_ms = 10_000
heartbeat_interval_ms = 2_000
recovery_log_every_s = 2.0
# Counted by recovery, the standby replica and a rebuilt local store (see `counts`).
recovery_counters = ("recovered_records", "rebuilt_shards", "standby_records")
# A shard whose batches fail this many times in a row (each followed by taking the shard
# over again) ends the worker: an outage of the broker is waited out by the retries
# inside one take-over, so this many failures mean something else is wrong.
max_failures_in_a_row = 20
producer_stop_timeout_s = 5.0
# Pruning needs the engine's clock to agree with the broker's within this, as seen by a
# commit no older than clock_check_fresh_s (see the module's docstring).
clock_skew_max_ms = 60_000
clock_check_fresh_s = 60.0

# (topic, key, value, partition)
# (topic, key, value, partition, headers)
Output = tuple[str, bytes | None, bytes | None, int, list[tuple[str, bytes]] | None]


@dataclass
class _Batch:
    """The records of one shard in one poll, and the offsets they advance to."""

    records: list[Any] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    first: dict[TopicPartition, int] = field(default_factory=dict)

    @classmethod
    def of(cls, records: list[Any]) -> _Batch:
        """A batch of some of a batch's records (kept in their order)."""
        batch = cls(records=records)
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            batch.first.setdefault(tp, record.offset)
            batch.offsets[tp] = record.offset + 1
        return batch


class _RecordFault(Exception):
    """A batch failed because of one of its records, not because of Kafka: splitting the
    batch finds the record (see `Engine._isolate`)."""


# What the producer or the broker raise about one record rather than the connection: too
# large (client-side max_request_size, the topic's max.message.bytes), or corrupt.
_RECORD_ERRORS = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    CorruptRecordException,
)


async def _delivered(producer: AIOKafkaProducer, *futures: list[asyncio.Future[Any]]) -> None:
    """Wait until every send of a batch is acknowledged; raise the first failure. (A
    flush and a scan: gathering ten thousand futures costs ten times as much.)"""
    await producer.flush()
    failed: BaseException | None = None
    for group in futures:
        for future in group:
            if not future.done():
                await asyncio.wait([future])
            error = future.exception()  # retrieved, so none is logged as lost
            if failed is None and error is not None:
                failed = error
    if failed is not None:
        raise failed


def _split(
    records: list[Any], error: BaseException, todo: list[tuple[list[Any], BaseException | None]]
) -> None:
    """Push the halves of a failed slice (the first on top), or a record left alone with
    the error it failed with."""
    if len(records) == 1:
        todo.append((records, error))
        return
    half = len(records) // 2
    todo += [(records[half:], None), (records[:half], None)]


def _about_a_record(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (_RecordFault, *_RECORD_ERRORS)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Engine:
    """One engine worker. `run()` until `stop()`; several workers share the shards."""

    def __init__(
        self,
        settings: Settings,
        *,
        app_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        # Epoch seconds: the engine's time (see the module's docstring), passed in.
        self.clock = clock
        self._shard_time_ms: dict[int, int] = {}
        # The engine's clock minus the broker's, and when that was last seen (monotonic).
        self.clock_skew_ms: int | None = None
        self._clock_checked = 0.0
        self.topics: Topics = deployment_topics(settings)
        self.partitions = settings.partitions
        self.app_id = app_id or engine_group(settings)
        self.group_id = self.app_id
        self.changelog = changelog_name(self.app_id)
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        self.data_dir = Path(settings.data_dir)
        self.retention_ms = settings.idempotency_retention_s * 1000
        self.stores: dict[int, ShardStore] = {}
        self.producers: dict[int, AIOKafkaProducer] = {}
        self.owned: set[int] = set()
        self.recovering: set[int] = set()
        self.assigned_once = asyncio.Event()
        # The recovery counters exist from the start, at 0, so that /readyz tells "none
        # read" from "no such counter" (the recovery tests read them by name).
        self.counts: Counter[str] = Counter(dict.fromkeys(recovery_counters, 0))
        self.consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._expiries: list[tuple[int, str, str]] = []
        self._expiry_known: set[tuple[int, str, str]] = set()
        self._next_rescan = 0.0
        self._next_prune = 0.0
        self._prune_cursor: dict[int, bytes | None] = {}
        # The next offset to apply per source partition: the committed offset after a
        # shard is taken over, then each committed batch's end. The consumer's own
        # position is not enough: right after an assignment aiokafka can deliver the
        # same records twice (a fetch from the committed offset in flight while the
        # position is reset to that same offset).
        self._next: dict[TopicPartition, int] = {}
        self.watchdog = Watchdog()
        self._failures: dict[int, int] = {}  # shard -> batches failed in a row
        # Set when the group refused this worker's settings (see `streams.agreement`).
        self.refused: str | None = None

    @property
    def ready(self) -> bool:
        """Serving: assigned at least once and no shard still recovering."""
        return self.assigned_once.is_set() and not self.recovering

    # Life cycle --------------------------------------------------------------------------

    async def run(self, *, client_id: str = "tally-engine") -> None:
        """Consume and apply until `stop()`. An infrastructure error that cannot be
        rolled back ends the run with the exception; nothing half-done is kept."""
        bootstrap = self.settings.kafka_bootstrap
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=self.group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            # Range keeps partition p of both topics on one worker: they are one shard;
            # and only workers that agree with the group's settings get any.
            partition_assignment_strategy=(self._assignor(),),
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            max_poll_interval_ms=300_000,
        )
        self.consumer.subscribe(
            [self.topics.commands.name, self.topics.internal.name], listener=_Listener(self)
        )
        standby = None
        if self.settings.table_standby_replicas > 0:
            standby = asyncio.create_task(self._standby(), name="standby")
        try:
            await self.consumer.start()
            while not self._stopping.is_set():
                polled = await self.consumer.getmany(
                    timeout_ms=poll_timeout_ms, max_records=poll_max_records
                )
                async with self._lock:
                    await self._process(polled)
                self._observe()
                if standby is not None and standby.done():
                    standby.result()  # a failed standby ends the run with its error
        finally:
            if standby is not None:
                standby.cancel()
                await asyncio.gather(standby, return_exceptions=True)
            await self._shutdown()
        if self.refused is not None:
            raise agreement.Disagreement(self.refused)

    def stop(self) -> None:
        self._stopping.set()

    async def _shutdown(self) -> None:
        async with self._lock:
            if self.consumer is not None:
                with contextlib.suppress(Exception):
                    await self.consumer.stop()
            for p in list(self.producers):
                await self._drop_producer(p)
            for store in self.stores.values():
                store.close()
            self.stores.clear()
            self.owned.clear()

    # Rebalancing -------------------------------------------------------------------------

    def _assignor(self) -> agreement.AgreeingAssignor:
        return agreement.AgreeingAssignor(
            agreement.terms(self.settings), started_ms=self._now_ms(), on_refused=self._refuse
        )

    def _refuse(self, verdict: agreement.Verdict) -> None:
        """The group gave this worker no shard because a setting differs: say which,
        once, and stop (the run then ends with `agreement.Disagreement`)."""
        if self.refused is None:
            self.refused = agreement.refusal(verdict, self.group_id)
            log.error("%s", self.refused)
        self.stop()

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:
            for p in {tp.partition for tp in revoked}:
                self.owned.discard(p)
                await self._drop_producer(p)
            for tp in revoked:
                self._next.pop(tp, None)
            self._forget_unowned()

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        if self.refused is not None:
            return  # never ready: it serves nothing and is stopping
        async with self._lock:
            shards = {tp.partition for tp in assigned}
            for p in set(self.producers) - shards:
                self.owned.discard(p)
                await self._drop_producer(p)
            new = sorted(shards - self.owned)
            self.recovering |= set(new)
            try:
                # Fence the shard's previous owner before reading what it left behind.
                await asyncio.gather(*(self._new_producer(p) for p in new))
                await self._recover(new)
                assert self.consumer is not None
                resume = {}
                for tp in sorted(assigned):
                    if tp.partition in new:
                        # Read after the fence: the last committed offset, final.
                        committed = await self.consumer.committed(tp)
                        resume[f"{tp.topic}[{tp.partition}]"] = committed
                        if committed is None:
                            self._next.pop(tp, None)
                        else:
                            self._next[tp] = committed
                if resume:
                    log.info("resuming at %s", resume)
            finally:
                self.recovering -= set(new)
            self.owned |= set(new)
            self._next_rescan = 0.0
            self.watchdog.assigned(
                [(tp.topic, tp.partition) for tp in assigned if tp.partition in self.owned],
                time.monotonic(),
            )
            self.assigned_once.set()
            log.info("serving shards %s", sorted(self.owned))

    async def _new_producer(self, p: int) -> None:
        await self._drop_producer(p)
        producer = durable_producer(
            self.settings.kafka_bootstrap,
            transactional_id=f"{self.group_id}-shard-{p}" if self.exactly_once else None,
            linger_ms=5,
            max_batch_size=512 * 1024,
            # A batch's first records often reach the broker while the previous
            # transaction's markers are still being written; Kafka >= 3.8 refuses them
            # with a retriable NOT_ENOUGH_REPLICAS (KIP-890 partition verification, see
            # aio-libs/aiokafka#1172). The default 100 ms backoff would stall the shard.
            retry_backoff_ms=10,
        )
        await producer.start()
        self.producers[p] = producer

    async def _drop_producer(self, p: int) -> None:
        producer = self.producers.pop(p, None)
        if producer is not None:
            # Bounded: a producer whose broker is gone can wait long for its batches.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), producer_stop_timeout_s)
        store = self.stores.get(p)
        if store is not None:
            store.discard()

    def _store(self, p: int) -> ShardStore:
        store = self.stores.get(p)
        if store is None:
            store = ShardStore(self.data_dir / f"shard-{p}", self.changelog)
            self.stores[p] = store
        return store

    async def _recover(self, shards: list[int]) -> None:
        """Bring each shard's RocksDB up to the end of its changelog partition."""
        if not shards:
            return
        restore = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await restore.start()
        try:
            tps = {p: TopicPartition(self.changelog, p) for p in shards}
            restore.assign(list(tps.values()))
            ends = await restore.end_offsets(list(tps.values()))
            todo: dict[TopicPartition, int] = {}
            total = 0
            for p, tp in tps.items():
                store = self._store(p)
                start = store.changelog_offset()
                if store.rebuilt:
                    self.counts["rebuilt_shards"] += 1
                    store.rebuilt = False  # counted once, not at every later take-over
                if start > ends[tp]:
                    log.warning("shard %d: local state is ahead of its changelog; wiped", p)
                    store.wipe()
                    start = 0
                if start < ends[tp]:
                    restore.seek(tp, start)
                    todo[tp] = ends[tp]
                    total += ends[tp] - start
            if not todo:
                return
            progress = Progress(
                f"recovering shards {shards}",
                total,
                unit="changelog records",
                say=log.info,
                every_s=recovery_log_every_s,
            )
            while todo:
                polled = await restore.getmany(*todo, timeout_ms=500, max_records=20_000)
                for tp, records in polled.items():
                    self.stores[tp.partition].restore(
                        [(r.key, r.value) for r in records], records[-1].offset + 1
                    )
                    progress.add(len(records))
                for tp in list(todo):
                    position = await restore.position(tp)
                    if position >= todo[tp]:
                        self.stores[tp.partition].restore([], position)
                        del todo[tp]
            self.counts["recovered_records"] += progress.done
            progress.close()
        finally:
            await restore.stop()

    async def _standby(self) -> None:
        """Keep every shard this worker does not own warm (TALLY_TABLE_STANDBY_REPLICAS):
        tail its changelog partition into its local store, so that when the shard is
        assigned here `_recover` only reads what the standby had not seen yet. Records
        are applied under the engine lock and only to shards still not owned; a shard
        being taken over is left alone (its recovery starts from the offset the
        standby copy reached, stored with the records in one write)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await consumer.start()
        tailing: set[int] = set()
        try:
            while not self._stopping.is_set():
                async with self._lock:
                    want = set(range(self.partitions)) - self.owned - self.recovering
                    if want != tailing:
                        tps = [TopicPartition(self.changelog, p) for p in sorted(want)]
                        consumer.assign(tps)
                        for tp in tps:
                            consumer.seek(tp, self._store(tp.partition).changelog_offset())
                        tailing = want
                if not tailing:
                    await asyncio.sleep(0.5)
                    continue
                polled = await consumer.getmany(timeout_ms=500, max_records=20_000)
                async with self._lock:
                    for tp, records in polled.items():
                        p = tp.partition
                        if not records or p in self.owned or p in self.recovering:
                            continue
                        store = self._store(p)
                        start = store.changelog_offset()
                        fresh = [(r.key, r.value) for r in records if r.offset >= start]
                        if fresh:
                            store.restore(fresh, records[-1].offset + 1)
                            self.counts["standby_records"] += len(fresh)
        finally:
            await consumer.stop()

    # The batch ---------------------------------------------------------------------------

    async def _process(self, polled: dict[TopicPartition, list[Any]]) -> None:
        batches: dict[int, _Batch] = {}
        for tp, records in polled.items():
            if tp.partition not in self.owned or not records:
                continue
            expected = self._next.get(tp)
            if expected is not None and records[0].offset < expected:
                # Already applied: delivered again by a fetch that raced a reset (see
                # `_next`). Applying it twice would give it two results.
                self.counts["redelivered"] += sum(r.offset < expected for r in records)
                records = [r for r in records if r.offset >= expected]
                if not records:
                    continue
            batch = batches.setdefault(tp.partition, _Batch())
            batch.records.extend(records)
            batch.first[tp] = records[0].offset
            batch.offsets[tp] = records[-1].offset + 1
        now = time.monotonic()
        expiries = self._due_expiries(now)
        prunes = self._due_prunes(now)
        shards = set(batches) | set(expiries) | set(prunes)
        if not shards:
            return
        outcomes = await asyncio.gather(
            *(
                self._shard_batch(
                    p, batches.get(p, _Batch()), expiries.get(p, []), prunes.get(p, [])
                )
                for p in sorted(shards)
            ),
            return_exceptions=True,
        )
        for p, outcome in zip(sorted(shards), outcomes, strict=True):
            if isinstance(outcome, BaseException):
                batch = batches.get(p, _Batch())
                if (
                    batch.records
                    and not _fenced(outcome, self.producers.get(p))
                    and (_about_a_record(outcome))
                ):
                    await self._isolate(p, batch, outcome)
                else:
                    await self._failed(p, batch, outcome)

    async def _shard_batch(
        self,
        p: int,
        batch: _Batch,
        expiries: list[Expire],
        prunes: list[CommandName],
        *,
        without_outputs: BaseException | None = None,
    ) -> None:
        """Decide the batch and commit it. With `without_outputs` (a batch of the one
        record that made its batch fail, and why), that record is answered on its own
        (`_answer_alone`) instead of being decided."""
        store = self.stores[p]
        producer = self.producers[p]
        out: list[Output] = []
        now_ms = self._time_ms(p)
        try:
            if without_outputs is not None:
                for record in batch.records:
                    self._answer_alone(p, record, without_outputs, now_ms, out)
            else:
                for record in batch.records:
                    self._handle(p, store, record, now_ms, out)
            for expire in expiries:
                self._decide(p, store, expire, now_ms, out)
            for name in prunes:
                store.forget_command(name)
            _check_sizes(out, store.pending.items())
        except Exception as exc:
            # Before any Kafka call: about the records, whatever it is.
            store.discard()
            raise _RecordFault(repr(exc)) from exc
        if self.exactly_once:
            await producer.begin_transaction()
        try:
            sent = [
                await producer.send(topic, value, key=key, partition=partition, headers=headers)
                for topic, key, value, partition, headers in out
            ]
            changelog = [
                await producer.send(self.changelog, value, key=key, partition=p)
                for key, value in store.pending.items()
            ]
            if self.exactly_once:
                if batch.offsets:
                    await producer.send_offsets_to_transaction(batch.offsets, self.group_id)
                # Every record delivered before the commit: aiokafka commits a transaction
                # even when the broker refused one of its batches (MESSAGE_TOO_LARGE, say),
                # so a refused record would be lost with its batch committed around it.
                await _delivered(producer, sent, changelog)
                await producer.commit_transaction()
            else:
                await _delivered(producer, sent, changelog)
                if batch.offsets:
                    assert self.consumer is not None
                    await self.consumer.commit(batch.offsets)
        except BaseException:
            store.discard()
            raise
        offsets = [f.result().offset for f in changelog]
        last = changelog[-1] if changelog else (sent[-1] if sent else None)
        if last is not None:
            self._check_clock(now_ms, last.result())
        store.flush(max(offsets) + 1 if offsets else None)
        self._next.update(batch.offsets)
        self._failures.pop(p, None)

    async def _failed(self, p: int, batch: _Batch, error: BaseException) -> None:
        """A shard's batch did not commit. Its local changes are already discarded."""
        if _fenced(error, self.producers.get(p)):
            # Another worker initialised the shard's transactional id: it owns the shard
            # now. Give it up, and ask the group for a new assignment, so that the
            # group's view and the fencing agree again (if the group still assigns the
            # shard here, it is taken over again from Kafka, fencing the other).
            log.warning("shard %d: fenced by a newer owner; giving it up", p)
            self.counts["fenced"] += 1
            self.owned.discard(p)
            self._forget_unowned()
            await self._drop_producer(p)
            _request_rejoin(self.consumer)
            return
        if not isinstance(error, Exception):
            raise error  # cancelled
        self.counts["batches_failed"] += 1
        self._failures[p] = self._failures.get(p, 0) + 1
        if self._failures[p] > max_failures_in_a_row:
            # Not an outage that passes: the same shard failing batch after batch is a
            # bug or a broken disk. End the worker (its supervisor restarts it, and the
            # shard moves) instead of spinning.
            raise error
        log.warning("shard %d: batch failed (%r); it will be read again", p, error)
        if self.exactly_once:
            try:
                await self.producers[p].abort_transaction()
            except Exception as exc:
                # The producer is unusable (its transaction state went fatal when the
                # broker went away in the middle of a commit, say), and whether the
                # commit happened is unknown: take the shard over again from Kafka.
                log.warning("shard %d: abort failed (%r); taking the shard over again", p, exc)
                await self._reclaim(p)
                return
        else:
            await self._reclaim(p)
            return
        assert self.consumer is not None
        for tp, offset in batch.first.items():
            self.consumer.seek(tp, offset)
            self._next[tp] = offset

    async def _isolate(self, p: int, batch: _Batch, error: BaseException) -> None:
        """Find the record that made shard p's batch fail and answer it alone: the batch is
        split in halves, each committed as its own transaction, in order, and a half that
        fails about a record again is split again. The record left alone is answered
        without its outputs; the records around it are applied as usual. A failure that is
        not about a record ends the search and takes the usual path for what is left (read
        again from Kafka). The batch's expiries and prunes are left to the next poll.

        Taking the shard over between two slices keeps exactly-once: it puts the store and
        the consumer back at what Kafka committed, which is the slices committed so far,
        and the records the consumer reads again from there are skipped by `_next` as
        the following slices commit them."""
        self.counts["isolations"] += 1
        log.warning("shard %d: batch failed on a record (%r); isolating it", p, error)
        self._next_rescan = 0.0  # the expiries the failed batch carried are found again
        # A stack of (records, why they are answered alone): the slice to commit next last.
        todo: list[tuple[list[Any], BaseException | None]] = []
        _split(batch.records, error, todo)
        failed: BaseException | None = error
        while todo:
            # A fault raised before the transaction began left nothing to undo. Anything
            # else is undone by taking the shard over again: a batch the broker refused
            # also cost the idempotent producer its sequence numbers (the next batch
            # would fail OutOfOrderSequenceNumber), so only a new producer goes on.
            if failed is not None and not isinstance(failed, _RecordFault):
                await self._reclaim(p)
                if p not in self.owned or p not in self.producers:
                    return  # no longer this worker's shard: its new owner reads it again
            failed = None
            part, alone = todo.pop()
            try:
                await self._shard_batch(p, _Batch.of(part), [], [], without_outputs=alone)
            except Exception as exc:
                failed = exc
                if (
                    alone is None
                    and _about_a_record(exc)
                    and not _fenced(exc, self.producers.get(p))
                ):
                    _split(part, exc, todo)
                    continue
                rest = [r for records, _ in reversed(todo) for r in records]
                await self._failed(p, _Batch.of(part + rest), exc)
                return
            if alone is not None:
                record = part[0]
                log.warning("shard %d: %s[%d]@%d answered alone (%r)", p, record.topic,
                            record.partition, record.offset, alone)  # fmt: skip
                self.counts["isolated"] += 1

    async def _reclaim(self, p: int) -> None:
        """Take shard p over again, as a new owner would: a new transactional producer
        (which fences any other holder of the shard's id and aborts its open
        transaction), the local store caught up from the changelog, and the consumer
        put back at the committed offsets. Whatever the failed batch did or did not
        commit, the shard then continues from what Kafka has. Retried, with backoff,
        until the broker answers: a broker restart must not end the worker."""
        assert self.consumer is not None
        self.recovering.add(p)
        delay = 0.5
        try:
            while True:
                if not any(tp.partition == p for tp in self.consumer.assignment()):
                    # No longer assigned here (the group moved it): taking it would
                    # fence its new owner.
                    self.owned.discard(p)
                    self._forget_unowned()
                    await self._drop_producer(p)
                    return
                try:
                    await self._new_producer(p)
                    await self._recover([p])
                    for tp in self.consumer.assignment():
                        if tp.partition != p:
                            continue
                        committed = await self.consumer.committed(tp)
                        if committed is None:
                            self._next.pop(tp, None)
                            await self.consumer.seek_to_beginning(tp)
                        else:
                            self._next[tp] = committed
                            self.consumer.seek(tp, committed)
                    self.counts["reclaimed"] += 1
                    log.info("shard %d: taken over again; serving", p)
                    return
                except (KafkaError, OSError, TimeoutError) as exc:
                    # The broker is not back yet. Anything else (a broken store) is not
                    # waited out: it ends the worker.
                    if self._stopping.is_set():
                        raise
                    log.warning("shard %d: cannot take it over yet (%r); retrying", p, exc)
                    await self._drop_producer(p)
                    await asyncio.sleep(delay)
                    delay = min(5.0, delay * 2)
        finally:
            self.recovering.discard(p)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _time_ms(self, p: int) -> int:
        """Shard p's time for its next batch: the engine's clock, held at the shard's
        previous time if the clock went back. (Record timestamps play no part.)"""
        now_ms = max(self._now_ms(), self._shard_time_ms.get(p, 0))
        self._shard_time_ms[p] = now_ms
        return now_ms

    def _check_clock(self, now_ms: int, written: Any) -> None:
        """Compare the time a batch was decided at with the broker's append time of its
        last record (a LogAppendTime topic's produce answer carries it)."""
        if getattr(written, "timestamp_type", None) != 1:
            return  # CreateTime: the timestamp is our own producer's, nothing learnt
        skew = now_ms - int(written.timestamp)
        was_right = self.clock_skew_ms is None or abs(self.clock_skew_ms) <= clock_skew_max_ms
        self.clock_skew_ms = skew
        self._clock_checked = time.monotonic()
        if abs(skew) > clock_skew_max_ms and was_right:
            self.counts["clock_skewed"] += 1
            log.error(
                "this worker's clock is %+.1fs from the broker's: pruning of idempotency "
                "records paused until they agree within %ds (fix the clock: NTP)",
                skew / 1000,
                clock_skew_max_ms // 1000,
            )

    def _clock_agrees(self, now: float) -> bool:
        """Whether a fresh check found the engine's clock within the skew allowed."""
        return (
            self.clock_skew_ms is not None
            and now - self._clock_checked <= clock_check_fresh_s
            and abs(self.clock_skew_ms) <= clock_skew_max_ms
        )

    def _handle(
        self, p: int, store: ShardStore, record: Any, now_ms: int, out: list[Output]
    ) -> None:
        """Decide one record of shard p's commands or internal partition at `now_ms`."""
        internal = record.topic == self.topics.internal.name
        decoded = decode_command(record.value or b"", internal=internal)
        if isinstance(decoded, Undecodable):
            self._dead_letter(p, record, decoded.reason, now_ms, out)
            return
        if isinstance(decoded, Invalid):
            outcome = ledger.reject_invalid(decoded, now_ms)
            self._emit(p, outcome, out, _source(record, internal))
            return
        owner = shard_of(decoded.account, self.partitions)
        if owner != p:
            # Placed by a partitioner other than murmur2 (kcat's CRC32, say): apply it
            # only on its account's shard, or one balance would live in two.
            # The copy carries the source of the record the client produced, so that
            # its result names that record (see `_source`). Always this record's own:
            # a record on a wrong partition is never a copy of ours (copies land on
            # their owner), so a tally-source header it carries is a producer's
            # invention and is not passed on.
            self.counts["forwarded"] += 1
            own = None if internal else [(SOURCE_HEADER, source(record.partition, record.offset))]
            out.append(
                (record.topic, decoded.account.encode(), record.value, owner, own)
            )  # fmt: skip
            return
        try:
            self._decide(p, store, decoded, now_ms, out, _source(record, internal))
        except Exception as exc:
            # A bug in the rules must not stop the shard: the record is parked with the
            # error, nothing of it was staged, and the next record goes on.
            log.exception("ledger failed on %s", decoded.command_id)
            self._dead_letter(p, record, f"engine error: {exc!r}", now_ms, out)

    def _decide(
        self,
        p: int,
        store: ShardStore,
        command: Command,
        now_ms: int,
        out: list[Output],
        source: list[tuple[str, bytes]] | None = None,
    ) -> None:
        outcome = ledger.apply(store, command, now_ms)
        store.commit(outcome)
        self._emit(p, outcome, out, source)
        if isinstance(command, Hold) and command.expires_at_ms is not None:
            self._watch((command.expires_at_ms, command.account, command.hold_id))

    def _emit(
        self,
        p: int,
        outcome: ledger.Outcome,
        out: list[Output],
        source: list[tuple[str, bytes]] | None = None,
    ) -> None:
        for emitted in outcome.emits:
            shard = shard_of(emitted.account, self.partitions)
            out.append(
                (self.topics.internal.name, emitted.account.encode(), encode(emitted), shard, None)
            )
        result = outcome.result
        self.counts[result.status.value] += 1
        out.append((self.topics.events.name, result.account.encode(), encode(result), p, source))

    def _answer_alone(
        self, p: int, record: Any, error: BaseException, now_ms: int, out: list[Output]
    ) -> None:
        """Answer the record that made its batch fail even alone, without deciding it
        (nothing of it is applied or remembered): a client command whose outcome would
        not fit in the records the engine writes gets `rejected` `record_too_large`;
        anything else (an internal command, a record that broke the engine) a dead letter
        naming the error, and without the record's bytes if it was the letter that was
        too large (a dead-letter topic with a small max.message.bytes)."""
        internal = record.topic == self.topics.internal.name
        try:
            decoded = decode_command(record.value or b"", internal=internal)
        except Exception:
            decoded = Undecodable("undecodable")
        if internal or isinstance(decoded, Undecodable) or not _too_large(error):
            reason = f"isolated: {error!r}"
            keep = 0 if _too_large(error) else limits.DEAD_LETTER_RAW_BYTES_MAX
            self._dead_letter(p, record, reason, now_ms, out, keep=keep)
            return
        result = Result(
            command_id=decoded.command_id,
            account=decoded.account,
            kind=decoded.kind if isinstance(decoded, Invalid) else kind_of(decoded),
            status=Status.REJECTED,
            reason=Reason.RECORD_TOO_LARGE,
            detail=f"its outcome cannot be written: {error!r}"[: limits.DETAIL_LEN_MAX],
            at_ms=now_ms,
        )
        self.counts[result.status.value] += 1
        out.append(
            (self.topics.events.name, result.account.encode(), encode(result), p,
             _source(record, internal))
        )  # fmt: skip

    def _dead_letter(
        self,
        p: int,
        record: Any,
        reason: str,
        now_ms: int,
        out: list[Output],
        *,
        keep: int = limits.DEAD_LETTER_RAW_BYTES_MAX,
    ) -> None:
        self.counts["dead_lettered"] += 1
        letter = dead_letter(
            reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            raw=record.value or b"",
            at_ms=now_ms,
            keep=keep,
        )
        out.append((self.topics.dead_letter.name, None, encode(letter), p, None))

    # Hold expiry -------------------------------------------------------------------------

    def _watch(self, item: tuple[int, str, str]) -> None:
        if item not in self._expiry_known:
            self._expiry_known.add(item)
            heapq.heappush(self._expiries, item)

    def _due_expiries(self, now: float) -> dict[int, list[Expire]]:
        """Expire commands for the open holds whose time has passed, by shard. An expiry
        is applied by the shard that owns the hold, in its next batch, with its own result."""
        if now >= self._next_rescan:
            # Holds of shards taken over from another worker are found by this scan.
            self._next_rescan = now + expiry_rescan_s
            for p in self.owned:
                for account, hold_id, held in self.stores[p].open_holds():
                    if held.expires_at_ms is not None:
                        self._watch((held.expires_at_ms, account, hold_id))
        due: dict[int, list[Expire]] = {}
        now_ms = self._now_ms()
        while self._expiries and self._expiries[0][0] <= now_ms:
            item = heapq.heappop(self._expiries)
            # Forgotten at once: if the batch that applies it aborts, the next rescan
            # finds the hold again.
            self._expiry_known.discard(item)
            expires, account, hold_id = item
            p = shard_of(account, self.partitions)
            open_hold = self.stores[p].hold(account, hold_id) if p in self.owned else None
            if open_hold is None or open_hold.expires_at_ms != expires:
                # Released, captured, or not this worker's shard (any more).
                continue
            digest = hashlib.blake2b(
                f"{account}|{hold_id}|{expires}".encode(), digest_size=16
            ).hexdigest()
            due.setdefault(p, []).append(
                Expire(command_id=f"expire.{digest}", account=account, hold_id=hold_id)
            )
        return due

    # Idempotency retention ---------------------------------------------------------------

    def _due_prunes(self, now: float) -> dict[int, list[CommandName]]:
        """Idempotency records older than the retention, a bounded slice per shard."""
        if now < self._next_prune or self.retention_ms <= 0 or not self._clock_agrees(now):
            return {}
        # Short retentions (tests) are pruned sooner than every prune_every_s.
        self._next_prune = now + min(prune_every_s, max(0.5, self.retention_ms / 4000))
        # The records' times are the engine's own (see `_time_ms`): no producer moves them.
        cutoff = self._now_ms() - self.retention_ms
        due: dict[int, list[CommandName]] = {}
        for p in sorted(self.owned):
            records, cursor = self.stores[p].commands_from(
                self._prune_cursor.get(p), prune_scan_per_shard
            )
            self._prune_cursor[p] = cursor
            old = [name for name, rec in records if rec.at_ms < cutoff]
            if old:
                due[p] = old
                self.counts["pruned"] += len(old)
        return due

    # Watchdog ----------------------------------------------------------------------------

    def _forget_unowned(self) -> None:
        self.watchdog.assigned(
            [k for k in self.watchdog.partitions if k[1] in self.owned], time.monotonic()
        )

    def _observe(self) -> None:
        """After each poll is processed: where each served partition stands (the
        consumer's position, which also moves past transaction markers and aborted
        records) and where it ends, for the watchdog; a partition newly stalled is
        logged once."""
        consumer = self.consumer
        if consumer is None:
            return
        now = time.monotonic()
        for tp in consumer.assignment():
            if tp.partition not in self.owned:
                continue
            key = (tp.topic, tp.partition)
            position = _position_now(consumer, tp)
            if position is not None:
                self.watchdog.advanced(key, position, now)
            self.watchdog.seen(key, consumer.highwater(tp), position, now=now)
        for topic, partition in self.watchdog.newly_stalled(now):
            log.warning(
                "%s[%d]: no progress for %.0fs with %d records waiting (stalled)",
                topic,
                partition,
                self.watchdog.stalled_for((topic, partition), now),
                self.watchdog.partitions[(topic, partition)].lag,
            )

    def progress(self) -> list[tuple[str, int, int, float]]:
        """(topic, partition, lag, seconds stalled) of every served partition, as of
        now: the ends are read fresh from the consumer's fetcher, which keeps fetching
        in the background, so a loop that hangs still shows its growing stall."""
        consumer = self.consumer
        now = time.monotonic()
        if consumer is not None:
            for tp in consumer.assignment():
                key = (tp.topic, tp.partition)
                if key in self.watchdog.partitions:
                    self.watchdog.seen(key, consumer.highwater(tp), None, now=now)
        return [
            (topic, partition, state.lag, self.watchdog.stalled_for((topic, partition), now))
            for (topic, partition), state in sorted(self.watchdog.partitions.items())
        ]

    # Reads -------------------------------------------------------------------------------

    def owns(self, account: str) -> bool:
        return shard_of(account, self.partitions) in self.owned

    def balances_of(self, account: str) -> dict[str, BalanceState]:
        store = self.stores[shard_of(account, self.partitions)]
        return store.balances_of(account)

    def status_of(self, account: str) -> str:
        """An account's status in the table view ("active" for one never configured)."""
        state = self.stores[shard_of(account, self.partitions)].account(account)
        return "active" if state is None else state.status

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """Hold off batches while a view reads. A batch's results are visible to
        clients from its Kafka commit, and its RocksDB write follows the commit inside
        the same locked section; a view that reads under the lock therefore shows
        every result a client can already have seen (read-your-writes)."""
        async with self._lock:
            yield


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.engine._revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.engine._assigned(assigned)


def _fenced(error: BaseException, producer: AIOKafkaProducer | None) -> bool:
    """Whether a failed batch means the shard's transactional id was taken by another
    worker: ProducerFenced anywhere in the error's chain, or as the reason the producer's
    sender stopped (then the batch itself may fail with a plainer error)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ProducerFenced):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        task = producer._sender.sender_task  # type: ignore[union-attr]
        return bool(
            task.done() and not task.cancelled() and isinstance(task.exception(), ProducerFenced)
        )
    except AttributeError:
        return False


def _request_rejoin(consumer: AIOKafkaConsumer | None) -> None:
    """Ask the group coordinator for a rebalance. (aiokafka has no public call for it;
    its coordinator's `request_rejoin` is what a subscription change uses.)"""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is not None and hasattr(coordinator, "request_rejoin"):
        coordinator.request_rejoin()


def _position_now(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's position of `tp` if it has one, without waiting. (aiokafka's
    `position()` waits for an offset reset; the watchdog must never hold the loop, so
    this reads the same subscription state `position()` reads.)"""
    try:
        state = consumer._subscription.subscription.assignment.state_value(tp)
        return int(state.position) if state.has_valid_position else None
    except (AttributeError, KeyError, TypeError):
        return None


_SOURCE_VALUE = re.compile(rb"[0-9]{1,10}:[0-9]{1,19}")


def _source(record: Any, internal: bool) -> list[tuple[str, bytes]] | None:
    """The header that ties a client command's result to the record it answers (see
    `topics.schema.SOURCE_HEADER`): the record itself, or, for a copy the engine
    forwarded from a wrong partition, the record the client produced (which the copy's
    own header names). A header is only taken as such when it is well formed and names
    another partition, as a forwarded copy's always does: a producer cannot make a
    record stand for one on its own partition (where the ingress's records are)."""
    if internal:
        return None
    forwarded = source_in(record.headers)
    if (
        forwarded is not None
        and _SOURCE_VALUE.fullmatch(forwarded)
        and int(forwarded.partition(b":")[0]) != record.partition
    ):
        return [(SOURCE_HEADER, forwarded)]
    return [(SOURCE_HEADER, source(record.partition, record.offset))]


def _check_sizes(out: list[Output], changelog: Iterable[tuple[bytes, bytes | None]]) -> None:
    """Refuse a batch that would write a record over limits.OUTPUT_BYTES_MAX, before
    anything is sent (the broker would refuse it, or aiokafka before it)."""
    for topic, key, value, _, headers in out:
        size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers or ())
        if size > limits.OUTPUT_BYTES_MAX:
            raise RecordTooLargeError(f"a record of {size} bytes for {topic}")
    for key, value in changelog:
        if len(key) + len(value or b"") > limits.OUTPUT_BYTES_MAX:
            raise RecordTooLargeError(f"a changelog value of {len(value or b'')} bytes")


def _too_large(error: BaseException) -> bool:
    """Whether a record failed for the size of what it would write."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(
            seen, (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
