"""The batch loop: each poll's records, split by shard, each shard's share decided, and
all of them committed as one Kafka transaction (`streams.transaction`), and what to do
when it fails.

One transaction per poll, not per shard: the worker's one producer (`streams.ownership`,
fenced by the group generation) writes every shard's outputs, changelog and consumed
offsets of the poll together. The broker's cost of a transaction grows with the
partitions it touches, and a shard's batch touches most of the internal topic (credits go
to their payees' shards), so a transaction per shard made each poll cost the broker about
shards x partitions; one per poll costs it the partitions once. The transaction is
committed in the background (`BatchLoop.in_flight`) while the next poll is fetched; the
next poll's batches are decided only after it committed (each batch is decided on the
state its predecessor committed), and with them the records the consumer fetched while
it was committing (`_joined`), which would otherwise wait for one more transaction. A
rebalance and a stop first wait for it (`drain`).

Per shard with work in a poll: its records are decided (`streams.records`) against the
shard's `ShardStore`, with the hold expiries and prunes that are due (`streams.timers`);
the transaction writes the outputs, the changelog and the consumed offsets together; only
after the commit does each batch reach its local RocksDB.

Poison isolation: a shard's batch that fails because of one of its records (an output
over limits.OUTPUT_BYTES_MAX or an error while deciding a record, found before the
transaction; or a record the broker refuses as too large or corrupt, which fails the
poll's transaction, whose shards are then each committed alone to find it) is split in
halves, each its own transaction, until the record is alone; that record is then
answered without its outputs (`rejected` `record_too_large` if it names a command_id,
else a bounded dead letter) and the records behind it go on. Only a failure that is not
about a record (the broker gone, a timeout, fencing) takes the retry and take-over
path, which re-reads the batch from Kafka. A transaction whose offsets the group refused
(this worker is not the member it was) gives its shards up until the group assigns them
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import (
    CorruptRecordException,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from aiokafka.structs import TopicPartition

from streams import kafka_internals, transaction
from streams.group_commit import StaleMember
from streams.ownership import Shards, fenced
from streams.records import Output, Records, check_sizes
from streams.timers import HoldExpiries, Prune, Pruning
from topics.schema import Expire

log = logging.getLogger(__name__)

# A shard whose batches fail this many times in a row (each followed by taking the shard
# over again) ends the worker: an outage of the broker is waited out by the retries
# inside one take-over, so this many failures mean something else is wrong.
max_failures_in_a_row = 20


@dataclass
class Batch:
    """The records of one shard in one poll, and the offsets they advance to."""

    records: list[Any] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    first: dict[TopicPartition, int] = field(default_factory=dict)

    @classmethod
    def of(cls, records: list[Any]) -> Batch:
        """A batch of some of a batch's records (kept in their order)."""
        batch = cls(records=records)
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            batch.first.setdefault(tp, record.offset)
            batch.offsets[tp] = record.offset + 1
        return batch


@dataclass
class Commit:
    """One poll's transaction in flight: its task, and the batches it commits by shard."""

    task: asyncio.Task[None]
    batches: dict[int, Batch]


class RecordFault(Exception):
    """A batch failed because of one of its records, not because of Kafka: splitting the
    batch finds the record (see `BatchLoop.isolate`)."""


# What the producer or the broker raise about one record rather than the connection: too
# large (client-side max_request_size, the topic's max.message.bytes), or corrupt.
_RECORD_ERRORS = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    CorruptRecordException,
)


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


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    """Why a finished batch task failed (cancelled counts), or None if it committed."""
    return asyncio.CancelledError() if task.cancelled() else task.exception()


def _stale(error: BaseException) -> bool:
    """Whether the group refused a transaction's offsets (`streams.group_commit`)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, StaleMember):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _about_a_record(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (RecordFault, *_RECORD_ERRORS)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class BatchLoop:
    """Applies polled records shard by shard, one transaction per shard batch."""

    def __init__(
        self,
        *,
        shards: Shards,
        records: Records,
        expiries: HoldExpiries,
        pruning: Pruning,
        exactly_once: bool,
        group_id: str,
        changelog: str,
        counts: Counter[str],
        poll_max_records: int,
        now_ms: Callable[[], int],
        time_ms: Callable[[int], int],
        check_clock: Callable[[int, Any], None],
    ) -> None:
        self.shards = shards
        self.records = records
        self.expiries = expiries
        self.pruning = pruning
        self.exactly_once = exactly_once
        self.group_id = group_id
        self.changelog = changelog
        self.counts = counts
        self.poll_max_records = poll_max_records
        # The engine's clock (see `streams.engine`): now, shard p's time for its next
        # batch, and the check of a committed batch's time against the broker's.
        self.now_ms = now_ms
        self.time_ms = time_ms
        self.check_clock = check_clock
        self._failures: dict[int, int] = {}  # shard -> batches failed in a row
        # The poll's transaction being committed in the background, if one is.
        self.in_flight: Commit | None = None
        # Seconds spent waiting for it with nothing to decide (`/metrics`, `/readyz`, and
        # `tally bench engine`'s share of a drain spent waiting on the broker).
        self.commit_wait_s = 0.0

    def _batches(self, polled: dict[TopicPartition, list[Any]]) -> dict[int, Batch]:
        """The polled records of the owned shards, by shard, without those already
        applied."""
        batches: dict[int, Batch] = {}
        for tp, records in polled.items():
            if tp.partition not in self.shards.owned or not records:
                continue
            expected = self.shards.next.get(tp)
            if expected is not None and records[0].offset < expected:
                # Already applied: delivered again by a fetch that raced a reset (see
                # `Shards.next`). Applying it twice would give it two results.
                self.counts["redelivered"] += sum(r.offset < expected for r in records)
                records = [r for r in records if r.offset >= expected]
                if not records:
                    continue
            batch = batches.setdefault(tp.partition, Batch())
            batch.records.extend(records)
            batch.first[tp] = records[0].offset
            batch.offsets[tp] = records[-1].offset + 1
        return batches

    async def process(self, polled: dict[TopicPartition, list[Any]]) -> None:
        """One poll: every shard's batch (with what its timers have due) decided once the
        previous poll's transaction has committed, and all of them started committing in
        the background, in one transaction; a failed one isolated or retried."""
        failed = await self._settle()
        rewound = set(failed)
        if not rewound:
            polled = await self._joined(polled)
        now = time.monotonic()
        owned, stores = self.shards.owned, self.shards.stores
        expiries = self.expiries.due(now, self.now_ms(), owned, stores)
        prunes = self.pruning.due(now, self.now_ms(), owned, stores)
        if rewound & set(expiries):
            self.expiries.rescan_soon()
        batches = self._batches(polled)
        for p in rewound & set(batches):
            self._read_again(batches[p], failed[p])
        decided: dict[int, tuple[list[Output], list[tuple[bytes, bytes | None]]]] = {}
        times: dict[int, int] = {}
        faults: dict[int, tuple[Batch, RecordFault]] = {}
        for p in sorted((set(batches) | set(expiries) | set(prunes)) - rewound):
            if p not in self.shards.owned:
                continue  # given up while the transaction in flight was settled
            batch = batches.get(p, Batch())
            if not batch.records and not any(tp.partition == p for tp in self.shards.next):
                # Timers due on a shard that never consumed: its transaction would carry
                # no offsets of it, which the group's check needs (`_commit`). Later.
                if p in expiries:
                    self.expiries.rescan_soon()
                continue
            times[p] = self.time_ms(p)
            try:
                decided[p] = self._decide(
                    p, batch, expiries.get(p, []), prunes.get(p, Prune()), times[p], None
                )
            except RecordFault as exc:
                faults[p] = (batch, exc)
                continue
            finally:
                # Deciding a whole poll takes seconds (128,000 records): between shards,
                # the group's heartbeats and the web endpoints get their turn, or the
                # group expels the worker at its session timeout.
                await asyncio.sleep(0)
            batches[p] = batch
        work = {p: batches[p] for p in decided}
        if work:
            task = asyncio.create_task(self._commit(work, decided, times), name="poll-commit")
            self.in_flight = Commit(task, work)
        if faults:
            # Isolated one by one, with the worker's one producer: after the rest.
            rewound = set(await self._settle())
            for p, (batch, why) in faults.items():
                if p in self.shards.owned and p not in rewound:
                    await self.isolate(p, batch, why)
                    self._resume_at_next(p)

    async def _joined(
        self, polled: dict[TopicPartition, list[Any]]
    ) -> dict[TopicPartition, list[Any]]:
        """The poll and, after it, the records the consumer fetched since (while the
        transaction in flight was committed), up to poll_max_records in all. Left for the
        next poll, they would wait for the transaction this poll is about to begin too:
        at a low rate, most of a command's latency. Only what is already fetched is
        taken (no timeout: `getmany` then returns at once), and not during a rebalance
        (it would wait for the assignment, holding the engine's lock the assignment
        needs). Called only when no shard was rewound, so the consumer's positions follow
        the poll's records."""
        consumer = self.shards.consumer
        room = self.poll_max_records - sum(len(records) for records in polled.values())
        if consumer is None or room <= 0 or kafka_internals.reassigning(consumer):
            return polled
        more = await consumer.getmany(timeout_ms=0, max_records=room)
        if not more:
            return polled
        joined = {tp: list(records) for tp, records in polled.items()}
        for tp, records in more.items():
            joined.setdefault(tp, []).extend(records)
        return joined

    async def _settle(self) -> dict[int, Batch]:
        """Wait for the poll's transaction in flight, and handle it if it failed (its
        shards isolated or retried, as a failed batch always is). Returns the batches of
        a transaction that failed, by shard: each shard is then put back at the next
        offset it is to apply from, so the records of it polled meanwhile are stale and
        read again (`_read_again`)."""
        failed = await self._finish()
        if failed is None:
            return {}
        commit, error = failed
        await self._failed_commit(commit.batches, error)
        for p in commit.batches:
            self._resume_at_next(p)
        return commit.batches

    def _read_again(self, stale: Batch, failed: Batch) -> None:
        """Records of a shard whose transaction failed, polled after it and dropped: each
        of their partitions must be read again from where they start. Those of the failed
        batch, and those the shard stands somewhere in, were put back already (by its
        handling, `_resume_at_next`); a partition in neither (one the shard never
        committed an offset of, its first records in this poll) is put back here, or its
        records would be passed over for good once a later batch commits past them."""
        consumer = self.shards.consumer
        if consumer is None:
            return
        for tp, first in stale.first.items():
            if tp.partition not in self.shards.owned:
                return  # given up: its next owner reads it from the committed offsets
            if tp not in failed.first and tp not in self.shards.next:
                consumer.seek(tp, first)

    async def quiet(self) -> None:
        """Wait until the transaction in flight, if one is, has ended: committed and
        written to its stores, or failed with its staged state discarded. Its outcome is
        left for the next poll to handle."""
        if self.in_flight is not None:
            await asyncio.wait([self.in_flight.task])

    async def _finish(self) -> tuple[Commit, BaseException] | None:
        """Wait for the transaction in flight, if one is; the transaction and why it
        failed, if it did."""
        commit, self.in_flight = self.in_flight, None
        if commit is None:
            return None
        started = time.monotonic()
        await asyncio.wait([commit.task])
        self.commit_wait_s += time.monotonic() - started
        error = _failure(commit.task)
        return None if error is None else (commit, error)

    async def _failed_commit(self, batches: dict[int, Batch], error: BaseException) -> None:
        """A poll's transaction did not commit (its shards' staged state is discarded)."""
        if _stale(error):
            await self._abort_or_renew()
            self.shards.give_up(set(batches))
            return
        if (
            any(batch.records for batch in batches.values())
            and not fenced(error, self.shards.producer)
            and _about_a_record(error)
        ):
            # The broker refused a record of one of the batches: take them all over again
            # (a refused batch also cost the idempotent producer its sequence numbers, so
            # only a new producer goes on), then commit each shard's batch alone, and
            # split the one that fails again.
            await self.shards.reclaim(set(batches))
            for p, batch in batches.items():
                if p in self.shards.owned and self.shards.producer is not None:
                    await self.isolate(p, batch, error, whole_first=True)
            return
        await self.failed(batches, error)

    async def _abort_or_renew(self) -> None:
        """End the producer's failed transaction: abort it, or, when the producer cannot
        (its state went fatal), replace the producer, which aborts it on the broker."""
        if not self.exactly_once or self.shards.producer is None:
            return
        try:
            await self.shards.producer.abort_transaction()
        except Exception as exc:
            log.warning("abort failed (%r); a new producer ends the transaction", exc)
            await self.shards.drop_producer()
            with contextlib.suppress(KafkaError, OSError, TimeoutError):
                await self.shards.new_producer()

    async def drain(self) -> set[int]:
        """Wait for the transaction in flight, before a rebalance or a stop. A failed one
        is not retried here (no retry while the group is changing): its shards are
        returned, to be taken over afresh, from what Kafka committed, if they stay this
        worker's; its producer's transaction is ended (aborted, or the producer
        replaced)."""
        failed = await self._finish()
        if failed is None:
            return set()
        commit, error = failed
        self.counts["batches_failed"] += 1
        log.warning(
            "shards %s: batch failed (%r) as the group changed", sorted(commit.batches), error
        )
        await self._abort_or_renew()
        return set(commit.batches)

    def _resume_at_next(self, p: int) -> None:
        """Point shard p's consumer at the offsets it is to apply next (after its failed
        batch was handled: retried, isolated or taken over), dropping what was fetched
        beyond them."""
        consumer = self.shards.consumer
        if consumer is None or p not in self.shards.owned:
            return
        for tp in consumer.assignment():
            if tp.partition == p and tp in self.shards.next:
                consumer.seek(tp, self.shards.next[tp])

    def _decide(
        self,
        p: int,
        batch: Batch,
        expiries: list[Expire],
        prunes: Prune,
        now_ms: int,
        without_outputs: BaseException | None,
    ) -> tuple[list[Output], list[tuple[bytes, bytes | None]]]:
        """Decide shard p's batch into its outputs and changelog records, its state
        changes staged in the store. Raises RecordFault (with nothing staged) if anything
        in it fails."""
        store = self.shards.stores[p]
        out: list[Output] = []
        try:
            if without_outputs is not None:
                for record in batch.records:
                    self.records.answer_alone(p, record, without_outputs, now_ms, out)
            else:
                for record in batch.records:
                    self.records.handle(p, store, record, now_ms, out)
            for expire in expiries:
                self.records.decide(p, store, expire, now_ms, out)
            prunes.apply(store)
            changes = store.changelog()
            check_sizes(out, changes)
        except Exception as exc:
            # Before any Kafka call: about the records, whatever it is.
            store.discard()
            raise RecordFault(repr(exc)) from exc
        return out, changes

    async def _commit(
        self,
        batches: dict[int, Batch],
        decided: dict[int, tuple[list[Output], list[tuple[bytes, bytes | None]]]],
        times: dict[int, int],
    ) -> None:
        """Commit decided batches in one transaction (the order: `streams.transaction`),
        then write each to its store. Every shard's transaction carries offsets for each
        of its partitions the worker knows (the batch's, else where the shard stands), so
        that the group's generation check covers everything the transaction writes for
        it (`streams.ownership`)."""
        offsets: dict[TopicPartition, int] = {}
        for tp, offset in self.shards.next.items():
            if tp.partition in batches:
                offsets[tp] = offset
        for batch in batches.values():
            offsets.update(batch.offsets)
        try:
            if self.shards.producer is None:
                raise KafkaConnectionError("no producer: the worker's was lost")
            unchecked = set(batches) - {tp.partition for tp in offsets}
            if self.exactly_once and unchecked:
                raise RuntimeError(f"shards {sorted(unchecked)} would commit without offsets")
            written = await transaction.commit(
                self.shards.producer,
                exactly_once=self.exactly_once,
                outputs=[o for out, _ in decided.values() for o in out],
                changelog=self.changelog,
                changes={p: changes for p, (_, changes) in decided.items() if changes},
                offsets=offsets,
                group_id=self.group_id,
                member=self.shards.member_offsets,
                as_member=kafka_internals.member(self.shards.consumer),
                consumer=self.shards.consumer,
            )
        except BaseException:
            for p in decided:
                self.shards.stores[p].discard()
            raise
        if written.last is not None:
            self.check_clock(max(times.values()), written.last)
        # Step 7 of the commit order: the committed batches reach RocksDB.
        for p in decided:
            self.shards.stores[p].flush(written.changelog_next_offset.get(p))
            self._failures.pop(p, None)
        self.shards.next.update(offsets)

    async def shard_batch(
        self,
        p: int,
        batch: Batch,
        expiries: list[Expire],
        prunes: Prune,
        *,
        without_outputs: BaseException | None = None,
    ) -> None:
        """Decide one shard's batch and commit it alone, now. With `without_outputs` (a
        batch of the one record that made its batch fail, and why), that record is
        answered on its own (`Records.answer_alone`) instead of being decided."""
        now_ms = self.time_ms(p)
        decided = self._decide(p, batch, expiries, prunes, now_ms, without_outputs)
        await self._commit({p: batch}, {p: decided}, {p: now_ms})

    async def failed(self, batches: dict[int, Batch], error: BaseException) -> None:
        """A transaction did not commit. Its shards' local changes are already discarded."""
        if not isinstance(error, Exception):
            raise error  # cancelled
        shards = set(batches)
        self.counts["batches_failed"] += 1
        for p in shards:
            self._failures[p] = self._failures.get(p, 0) + 1
            if self._failures[p] > max_failures_in_a_row:
                # Not an outage that passes: the same shard failing batch after batch is
                # a bug or a broken disk. End the worker (its supervisor restarts it, and
                # the shard moves) instead of spinning.
                raise error
        log.warning("shards %s: batch failed (%r); it will be read again", sorted(shards), error)
        if not self.exactly_once or fenced(error, self.shards.producer):
            # At-least-once: whether the offsets were committed is unknown. Fenced: the
            # producer is unusable. Either way, take the shards over again from Kafka.
            await self.shards.reclaim(shards)
            return
        try:
            assert self.shards.producer is not None
            await self.shards.producer.abort_transaction()
        except Exception as exc:
            # The producer is unusable (its transaction state went fatal when the broker
            # went away in the middle of a commit, say), and whether the commit happened
            # is unknown: take the shards over again from Kafka.
            log.warning("shards %s: abort failed (%r); taking them over again", sorted(shards), exc)
            await self.shards.reclaim(shards)
            return
        consumer = self.shards.consumer
        assert consumer is not None
        for batch in batches.values():
            for tp, offset in batch.first.items():
                consumer.seek(tp, offset)
                self.shards.next[tp] = offset

    async def isolate(
        self, p: int, batch: Batch, error: BaseException, *, whole_first: bool = False
    ) -> None:
        """Find the record that made shard p's batch fail and answer it alone: the batch is
        split in halves, each committed as its own transaction, in order, and a half that
        fails about a record again is split again. The record left alone is answered
        without its outputs; the records around it are applied as usual. A failure that is
        not about a record ends the search and takes the usual path for what is left (read
        again from Kafka). The batch's expiries and prunes are left to the next poll.

        Taking the shard over between two slices keeps exactly-once: it puts the store and
        the consumer back at what Kafka committed, which is the slices committed so far,
        and the records the consumer reads again from there are skipped by `Shards.next`
        as the following slices commit them.

        `whole_first`: the batch failed in a transaction with other shards' batches, which
        the caller has already taken over again; it is first committed whole, alone."""
        self.counts["isolations"] += 1
        log.warning("shard %d: batch failed on a record (%r); isolating it", p, error)
        self.expiries.rescan_soon()  # the expiries the failed batch carried are found again
        # A stack of (records, why they are answered alone): the slice to commit next last.
        todo: list[tuple[list[Any], BaseException | None]] = []
        failed: BaseException | None = error
        if whole_first:
            todo.append((batch.records, None))
            failed = None
        else:
            _split(batch.records, error, todo)
        while todo:
            # A fault raised before the transaction began left nothing to undo. Anything
            # else is undone by taking the shard over again: a batch the broker refused
            # also cost the idempotent producer its sequence numbers (the next batch
            # would fail OutOfOrderSequenceNumber), so only a new producer goes on.
            if failed is not None and not isinstance(failed, RecordFault):
                await self.shards.reclaim({p})
                if p not in self.shards.owned or self.shards.producer is None:
                    return  # no longer this worker's shard: its new owner reads it again
            failed = None
            part, alone = todo.pop()
            try:
                await self.shard_batch(p, Batch.of(part), [], Prune(), without_outputs=alone)
            except Exception as exc:
                failed = exc
                if (
                    alone is None
                    and _about_a_record(exc)
                    and not fenced(exc, self.shards.producer)
                    and not _stale(exc)
                ):
                    _split(part, exc, todo)
                    continue
                rest = [r for records, _ in reversed(todo) for r in records]
                if _stale(exc):
                    await self._abort_or_renew()
                    self.shards.give_up({p})
                else:
                    await self.failed({p: Batch.of(part + rest)}, exc)
                return
            if alone is not None:
                record = part[0]
                log.warning("shard %d: %s[%d]@%d answered alone (%r)", p, record.topic,
                            record.partition, record.offset, alone)  # fmt: skip
                self.counts["isolated"] += 1
