"""The batch loop: each poll's records, split by shard, each shard's share decided and
committed as one Kafka transaction (`streams.transaction`), and what to do when a
shard's batch fails.

Shards do not wait for each other. A shard's batch is committed in the background
(`BatchLoop.in_flight`) while the next poll goes on: its other shards are decided and
committed at once, and only shard p's own next batch waits until p's batch in flight has
committed (one transaction at a time per shard, and a batch is decided on the state its
predecessor committed). So the worker decides while the broker commits, and one slow
transaction no longer holds up every shard's results. A rebalance and a stop first wait
for every batch in flight (`drain`).

Per batch of shard p: every record is decided (`streams.records`) against the shard's
`ShardStore`, with the hold expiries and prunes that are due (`streams.timers`); the
transaction writes the outputs, the changelog and the consumed offsets together; only
after the commit does the batch reach the local RocksDB.

Poison isolation: a batch that fails because of one of its records (an output over
limits.OUTPUT_BYTES_MAX, a record the broker refuses as too large or corrupt, an error
while deciding a record) is aborted and split in halves, each its own transaction, until
the record is alone; that record is then answered without its outputs (`rejected`
`record_too_large` if it names a command_id, else a bounded dead letter) and the records
behind it go on. Only a failure that is not about a record (the broker gone, a timeout,
fencing) takes the retry and take-over path, which re-reads the batch from Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import (
    CorruptRecordException,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from aiokafka.structs import TopicPartition

from streams import transaction
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
        # The engine's clock (see `streams.engine`): now, shard p's time for its next
        # batch, and the check of a committed batch's time against the broker's.
        self.now_ms = now_ms
        self.time_ms = time_ms
        self.check_clock = check_clock
        self._failures: dict[int, int] = {}  # shard -> batches failed in a row
        # Per shard, its batch being committed in the background, and that batch.
        self.in_flight: dict[int, tuple[asyncio.Task[None], Batch]] = {}

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
        """One poll: every shard's batch (with what its timers have due) started in the
        background, each in its own transaction, once that shard's previous batch has
        committed; a failed one isolated or retried."""
        await self._settle([p for p, (task, _) in self.in_flight.items() if task.done()])
        now = time.monotonic()
        owned, stores = self.shards.owned, self.shards.stores
        expiries = self.expiries.due(now, self.now_ms(), owned, stores)
        prunes = self.pruning.due(now, self.now_ms(), owned, stores)
        named = {tp.partition for tp, records in polled.items() if records}
        # Shard p's batch in flight first: it moves p's next offsets (which the records
        # polled are checked against), or, failed, puts p's consumer back.
        rewound = await self._settle(
            sorted((named | set(expiries) | set(prunes)) & set(self.in_flight))
        )
        if rewound & set(expiries):
            self.expiries.rescan_soon()
        batches = self._batches(polled)
        for p in sorted((set(batches) | set(expiries) | set(prunes)) - rewound):
            if p not in self.shards.owned:
                continue  # given up while a batch in flight was settled
            batch = batches.get(p, Batch())
            task = asyncio.create_task(
                self.shard_batch(p, batch, expiries.get(p, []), prunes.get(p, Prune())),
                name=f"shard-{p}-batch",
            )
            self.in_flight[p] = (task, batch)

    async def _settle(self, shards: list[int]) -> set[int]:
        """Wait for these shards' batches in flight, and handle those that failed
        (isolated or retried, as a failed batch always is). Returns the shards whose batch
        failed: each is then put back at the next offset it is to apply from, so the
        records of it polled meanwhile are stale and read again."""
        settling = [(p, *self.in_flight.pop(p)) for p in shards if p in self.in_flight]
        if not settling:
            return set()
        await asyncio.wait([task for _, task, _ in settling])
        failed: set[int] = set()
        for p, task, batch in settling:
            outcome = _failure(task)
            if outcome is None:
                continue
            failed.add(p)
            if (
                batch.records
                and not fenced(outcome, self.shards.producers.get(p))
                and (_about_a_record(outcome))
            ):
                await self.isolate(p, batch, outcome)
            else:
                await self.failed(p, batch, outcome)
            self._resume_at_next(p)
        return failed

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

    async def drain(self) -> set[int]:
        """Wait for every batch in flight, before a rebalance or a stop. A failed one is
        not handled here (no retry while the group is changing): the shards returned are
        to be taken over afresh, from what Kafka committed, if they stay this worker's."""
        settling, self.in_flight = self.in_flight, {}
        if settling:
            await asyncio.wait([task for task, _ in settling.values()])
        failed: set[int] = set()
        for p, (task, _) in settling.items():
            error = _failure(task)
            if error is not None:
                failed.add(p)
                self.counts["batches_failed"] += 1
                log.warning("shard %d: batch failed (%r) as the group changed", p, error)
        return failed

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

    async def shard_batch(
        self,
        p: int,
        batch: Batch,
        expiries: list[Expire],
        prunes: Prune,
        *,
        without_outputs: BaseException | None = None,
    ) -> None:
        """Decide the batch and commit it (the order: `streams.transaction`). With
        `without_outputs` (a batch of the one record that made its batch fail, and why),
        that record is answered on its own (`Records.answer_alone`) instead of being
        decided."""
        store = self.shards.stores[p]
        now_ms = self.time_ms(p)
        out, changes = self._decide(p, batch, expiries, prunes, now_ms, without_outputs)
        try:
            written = await transaction.commit(
                self.shards.producers[p],
                exactly_once=self.exactly_once,
                outputs=out,
                changelog=self.changelog,
                partition=p,
                changes=changes,
                offsets=batch.offsets,
                group_id=self.group_id,
                consumer=self.shards.consumer,
            )
        except BaseException:
            store.discard()
            raise
        if written.last is not None:
            self.check_clock(now_ms, written.last)
        # Step 7 of the commit order: the committed batch reaches RocksDB.
        store.flush(written.changelog_next_offset)
        self.shards.next.update(batch.offsets)
        self._failures.pop(p, None)

    async def failed(self, p: int, batch: Batch, error: BaseException) -> None:
        """A shard's batch did not commit. Its local changes are already discarded."""
        if fenced(error, self.shards.producers.get(p)):
            await self.shards.give_up(p)
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
                await self.shards.producers[p].abort_transaction()
            except Exception as exc:
                # The producer is unusable (its transaction state went fatal when the
                # broker went away in the middle of a commit, say), and whether the
                # commit happened is unknown: take the shard over again from Kafka.
                log.warning("shard %d: abort failed (%r); taking the shard over again", p, exc)
                await self.shards.reclaim(p)
                return
        else:
            await self.shards.reclaim(p)
            return
        consumer = self.shards.consumer
        assert consumer is not None
        for tp, offset in batch.first.items():
            consumer.seek(tp, offset)
            self.shards.next[tp] = offset

    async def isolate(self, p: int, batch: Batch, error: BaseException) -> None:
        """Find the record that made shard p's batch fail and answer it alone: the batch is
        split in halves, each committed as its own transaction, in order, and a half that
        fails about a record again is split again. The record left alone is answered
        without its outputs; the records around it are applied as usual. A failure that is
        not about a record ends the search and takes the usual path for what is left (read
        again from Kafka). The batch's expiries and prunes are left to the next poll.

        Taking the shard over between two slices keeps exactly-once: it puts the store and
        the consumer back at what Kafka committed, which is the slices committed so far,
        and the records the consumer reads again from there are skipped by `Shards.next`
        as the following slices commit them."""
        self.counts["isolations"] += 1
        log.warning("shard %d: batch failed on a record (%r); isolating it", p, error)
        self.expiries.rescan_soon()  # the expiries the failed batch carried are found again
        # A stack of (records, why they are answered alone): the slice to commit next last.
        todo: list[tuple[list[Any], BaseException | None]] = []
        _split(batch.records, error, todo)
        failed: BaseException | None = error
        while todo:
            # A fault raised before the transaction began left nothing to undo. Anything
            # else is undone by taking the shard over again: a batch the broker refused
            # also cost the idempotent producer its sequence numbers (the next batch
            # would fail OutOfOrderSequenceNumber), so only a new producer goes on.
            if failed is not None and not isinstance(failed, RecordFault):
                await self.shards.reclaim(p)
                if p not in self.shards.owned or p not in self.shards.producers:
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
                    and not fenced(exc, self.shards.producers.get(p))
                ):
                    _split(part, exc, todo)
                    continue
                rest = [r for records, _ in reversed(todo) for r in records]
                await self.failed(p, Batch.of(part + rest), exc)
                return
            if alone is not None:
                record = part[0]
                log.warning("shard %d: %s[%d]@%d answered alone (%r)", p, record.topic,
                            record.partition, record.offset, alone)  # fmt: skip
                self.counts["isolated"] += 1
