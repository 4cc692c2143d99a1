"""Shard ownership: which shards this worker serves, and taking one on or giving it up.

Fencing by the group (KIP-447; Kafka Streams' exactly_once_v2). Each worker has one
transactional producer, `transactional.id` = `<group>-worker-<instance id>`, and one
transaction per poll covers every shard's batch of that poll (`streams.loop`). What keeps
a worker the group has moved past (paused, cut off, expelled) from committing for a shard
it no longer owns is the group generation: every transaction sends its consumed offsets
with the member id and generation the batches were decided under, and the group
coordinator refuses them from a member that is not the group's current one
(`streams.group_commit`); the transaction then fails before it commits and is aborted.
Every transaction carries offsets for each shard it writes for, so none escapes the check.

Taking a shard on, in this order: read its committed offsets with `require_stable`, which
waits while a transaction that already sent offsets for it (the previous owner's, accepted
before the group moved on) is still open; wait until no transaction is open on its
changelog partition (one whose offsets are still to be refused, or whose commit marker is
still on its way, `streams.recovery`); catch its state up from the changelog; apply from
the offsets read. So what the previous owner committed is all in, and what it did not
commit never will be. The same steps take a shard over again after a transaction whose
outcome is unknown (`reclaim`), after a new producer of this worker's id has first ended
its own open transaction.

Kept across a rebalance. The group's rebalances are eager: every member gives up every
partition before the new assignment, even those it gets back. A shard this worker owned
in generation G and is given again in generation G + 1 was nobody else's in between
(the classic protocol's generations count rebalances one by one, and each assigns a
partition to one member), so it is kept as it is: same store, same next offsets, no
catch-up. Only when the new generation is not G + 1 (this worker missed one, for example
it was expelled for a missed heartbeat and rejoined) is every shard taken over afresh,
because another worker may have owned it meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.structs import TopicPartition

from streams import kafka_internals
from streams.group_commit import MemberOffsets, stable_committed
from streams.recovery import recover
from streams.store import ShardStore
from streams.timers import HoldExpiries
from streams.watchdog import Watchdog
from topics.producer import durable_producer

log = logging.getLogger(__name__)

producer_stop_timeout_s = 5.0
# The worker's transactions are aborted by their coordinator after this long: how long a
# shard taken over from a worker that died in the middle of one waits for it (the
# changelog's and the offsets' waits, `streams.recovery.settle_timeout_s` and
# `stable_timeout_s`, are longer). A transaction is begun only after its poll's batches
# are decided, so this bounds sending and committing them, not deciding.
transaction_timeout_ms = 10_000
stable_timeout_s = 30.0
# A transaction begun right after the previous one committed waits for the coordinator to
# write that one's markers (CONCURRENT_TRANSACTIONS, retried): every 3 ms instead of
# aiokafka's 20. With one producer per worker that is every transaction: at 200
# commands/s the wait was most of the p90 transaction time (29 ms against 13 ms with
# 3 ms, `tally bench engine --count 20000`, instrumented). One small request per retry to
# the coordinator. aiokafka keeps it in a module global, so it is set for the process
# (the worker's producer is its only transactional one).
transaction_begin_backoff_s = 0.003
# In the data directory: each shard's store (shard-<p>), and the shards served at the
# last assignment (see `last_owned`).
store_prefix = "shard-"
owned_file = "owned.json"
# Expelled from the group (its member id no longer known) this many times within
# expelled_window_s: another process joins under this worker's instance id, and each
# join of one expels the other. Kafka's fencing keeps both from committing for one
# shard, but they would take the shards from each other forever; one of them stops.
expelled_max = 3
expelled_window_s = 60.0
reclaim_backoff_first_s = 0.5
reclaim_backoff_max_s = 5.0


def fenced(error: BaseException, producer: AIOKafkaProducer | None) -> bool:
    """Whether a failed transaction means the producer's epoch was taken from it (another
    producer initialised the worker's transactional id, or its coordinator aborted a
    transaction that outlived the timeout): ProducerFenced anywhere in the error's chain,
    or as the reason the producer's sender stopped (then the batch itself may fail with a
    plainer error). Such a producer is unusable, and never about a record."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ProducerFenced):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(kafka_internals.sender_error(producer), ProducerFenced)


class Shards:
    """The shards this worker owns, their stores, the worker's one producer, and where
    each of the shards' source partitions is to be applied from."""

    def __init__(
        self,
        *,
        bootstrap: str,
        group_id: str,
        changelog: str,
        data_dir: Path,
        exactly_once: bool,
        lock: asyncio.Lock,
        stopping: asyncio.Event,
        counts: Counter[str],
        watchdog: Watchdog,
        expiries: HoldExpiries,
        instance_id: str,
        on_duplicate: Callable[[], None] = lambda: None,
    ) -> None:
        self.bootstrap = bootstrap
        self.instance_id = instance_id
        self.group_id = group_id
        self.changelog = changelog
        self.data_dir = data_dir
        self.exactly_once = exactly_once
        # The engine's one lock: batches, rebalances, the standby and reads take turns.
        self.lock = lock
        self.stopping = stopping
        self.counts = counts
        self.watchdog = watchdog
        self.expiries = expiries
        self.on_duplicate = on_duplicate
        self.expelled: list[float] = []
        # Waits for the batches in flight and names the shards whose batch failed (set by
        # the engine to its batch loop's `drain`).
        self.drain: Callable[[], Awaitable[set[int]]] = _nothing_in_flight
        self.consumer: AIOKafkaConsumer | None = None  # set by the engine's run
        self.stores: dict[int, ShardStore] = {}
        # The worker's one producer, and (exactly-once) what sends its transactions'
        # offsets as the group member (`streams.group_commit`).
        self.producer: AIOKafkaProducer | None = None
        self.member_offsets: MemberOffsets | None = None
        self.owned: set[int] = set()
        # Owned until the rebalance under way, and the generation they were owned in.
        self.held: set[int] = set()
        self.held_generation: int | None = None
        self.recovering: set[int] = set()
        # The take-over of the shards newly assigned, under way outside the rebalance
        # callback (see `assigned`).
        self.taking: asyncio.Task[None] | None = None
        # What a take-over failed with, for the run to end with (`check`).
        self.failure: BaseException | None = None
        self.assigned_once = asyncio.Event()
        # The next offset to apply per source partition: the committed offset after a
        # shard is taken over, then each committed batch's end. The consumer's own
        # position is not enough: right after an assignment aiokafka can deliver the
        # same records twice (a fetch from the committed offset in flight while the
        # position is reset to that same offset).
        self.next: dict[TopicPartition, int] = {}

    def store(self, p: int) -> ShardStore:
        store = self.stores.get(p)
        if store is None:
            store = ShardStore(self.data_dir / f"{store_prefix}{p}", self.changelog)
            self.stores[p] = store
        return store

    def stored(self) -> set[int]:
        """The shards this worker has a local store of (opened or not), from the data
        directory."""
        n = len(store_prefix)
        return {
            int(d.name[n:]) for d in self.data_dir.glob(f"{store_prefix}*") if d.name[n:].isdigit()
        }

    def busy(self) -> set[int]:
        """The shards owned, held through a rebalance or being taken over (the standby
        leaves them alone)."""
        return self.owned | self.held | self.recovering

    # Rebalancing -------------------------------------------------------------------------

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        """The group is rebalancing: stop serving the revoked shards, but keep their
        stores and next offsets until the assignment says whether they come back (see
        the module's docstring). A take-over under way is called off: its shards were
        not served yet, and what it caught up of their stores stays there."""
        await self.stop_taking()
        async with self.lock:
            # A shard whose batch failed as the group changed is not kept: it is taken
            # over afresh if it comes back.
            for p in await self.drain():
                self.owned.discard(p)
                self.forget(p)
            gone = {tp.partition for tp in revoked}
            self.held |= self.owned & gone
            self.owned -= gone
            self.held_generation = kafka_internals.generation(self.consumer)
            if self.held_generation is None and gone:
                self._expelled(time.monotonic())
            self.forget_unowned()

    def _expelled(self, now: float) -> None:
        """A revocation with no generation: the group forgot this member (a missed
        session, or another process under the same instance id took its place)."""
        self.expelled = [t for t in self.expelled if now - t < expelled_window_s] + [now]
        if len(self.expelled) >= expelled_max:
            # Rejoin (aiokafka does so right after this callback) without the instance
            # id, so as not to expel the other process once more, and stop.
            kafka_internals.become_dynamic(self.consumer)
            self.on_duplicate()

    def holdings(self) -> set[int]:
        """The shards this worker serves or holds through a rebalance (what it claims
        in the group's placement)."""
        return self.owned | self.held

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        """The group's new assignment: the shards kept through the rebalance are served
        at once; the new ones are taken over (`_take_on`) in a task of their own, each
        one's partitions paused until it is served.

        Not in this callback: aiokafka sends no heartbeat while a rebalance callback
        runs (`ensure_active_group` stops its heartbeat task until the join is done), so
        a take-over longer than the session timeout (waiting out the previous owner's
        transaction, reading a large changelog) had the group expel this worker; it
        rejoined, was assigned the shards again and began again, and the group never
        settled (`tally bench recovery`, 1M balances: expelled at every attempt)."""
        await self.stop_taking()
        async with self.lock:
            shards = {tp.partition for tp in assigned}
            generation = kafka_internals.generation(self.consumer)
            consecutive = (
                self.held_generation is not None
                and generation is not None
                and generation == self.held_generation + 1
            )
            kept = self.held & shards if consecutive else set()
            self.held = set()
            # (Empty after a revocation. Never a shard not given, nor, after a gap in
            # generations, one not taken over afresh.)
            self.owned = self.owned & shards if consecutive else set()
            for p in set(self.stores) - kept - self.owned:
                self.forget(p)
            for tp in list(self.next):
                if tp.partition not in kept | self.owned:
                    self.next.pop(tp, None)
            self.owned |= kept
            # Counted for /readyz: assignments received, shards kept through one, and
            # shards taken over (fenced and caught up, counted once they are).
            self.counts["assignments"] += 1
            self.counts["kept_shards"] += len(kept)
            new = sorted(shards - self.owned)
            self.assigned_once.set()
            self._serving(assigned)
            log.info("serving shards %s (kept %s)", sorted(self.owned), sorted(kept))
            if new:
                tps = sorted(tp for tp in assigned if tp.partition in new)
                # Nothing of theirs is fetched (aiokafka drops what a fetch in flight
                # brings for a paused partition) until they are caught up and put at
                # their committed offsets.
                self._pause(tps)
                self.recovering |= set(new)
                self.taking = asyncio.create_task(
                    self._take_on(new, tps, assigned), name=f"take over shards {new}"
                )
                self.taking.add_done_callback(self._taken)

    async def _take_on(
        self, new: list[int], tps: list[TopicPartition], assigned: set[TopicPartition]
    ) -> None:
        """Take the new shards over (the steps: the module's docstring), and serve each
        from its committed offsets as soon as its state is caught up: a shard whose
        changelog partition is still held by an open transaction does not hold up the
        others, nor do the kept shards' batches wait. Retried, with backoff, until the
        broker answers: a broker restart in the middle of an assignment is waited out,
        like one in the middle of a take-over (`reclaim`). The producer is left as it is
        on a failure: the kept shards' batches use it meanwhile, and one that a broker
        restart broke fails their next transaction, which makes a new one (`reclaim`)."""
        delay = reclaim_backoff_first_s
        left = set(new)  # not served yet
        try:
            while left:
                todo = sorted(left)
                try:
                    async with self.lock:  # one producer, made by one task at a time
                        if self.producer is None:
                            await self.new_producer()
                    # What the previous owners committed, final.
                    committed = await self._committed([tp for tp in tps if tp.partition in todo])
                    await self._recover(
                        todo,
                        ready=functools.partial(
                            self._serve, committed=committed, assigned=assigned, left=left
                        ),
                    )
                except (KafkaError, OSError, TimeoutError) as exc:
                    if self.stopping.is_set():
                        raise
                    log.warning("shards %s: cannot take them on yet (%r); retrying", todo, exc)
                    await asyncio.sleep(delay)
                    delay = min(reclaim_backoff_max_s, delay * 2)
        finally:
            self.recovering -= set(new)

    async def _serve(
        self,
        shards: list[int],
        committed: dict[TopicPartition, int | None],
        assigned: set[TopicPartition],
        left: set[int],
    ) -> None:
        """Serve these newly caught-up shards from their committed offsets (and take them
        off the take-over's `left`)."""
        async with self.lock:
            await self._seek({tp: o for tp, o in committed.items() if tp.partition in shards})
            # From here on nothing waits: a rebalance (which calls the take-over off
            # first) finds each shard either served or not.
            self._resume([tp for tp in committed if tp.partition in shards])
            self.owned |= set(shards)
            self.recovering -= set(shards)
            self.counts["taken_shards"] += len(shards)
            left.difference_update(shards)
            self.expiries.rescan_soon()
            self._serving(assigned)
            log.info("took over shards %s; serving %s", shards, sorted(self.owned))

    async def stop_taking(self) -> None:
        """Call off the take-over under way, if any, and wait until it has stopped."""
        task, self.taking = self.taking, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    def _taken(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()

    def check(self) -> None:
        """Raise the error a take-over ended with: anything the broker's absence does not
        explain (a broken store) ends the worker, as in `reclaim`."""
        if self.failure is not None:
            raise self.failure

    def _serving(self, assigned: set[TopicPartition]) -> None:
        """The partitions of the shards now served, for the watchdog, and those shards
        written down for the next placement."""
        self.watchdog.assigned(
            [(tp.topic, tp.partition) for tp in assigned if tp.partition in self.owned],
            time.monotonic(),
        )
        self._note_owned()

    def _pause(self, tps: list[TopicPartition]) -> None:
        if self.consumer is not None and tps:
            self.consumer.pause(*tps)

    def _resume(self, tps: list[TopicPartition]) -> None:
        assert self.consumer is not None
        here = self.consumer.assignment()
        self.consumer.resume(*(tp for tp in tps if tp in here))

    def _note_owned(self) -> None:
        """Write down which shards this worker serves, for the group's placement after a
        restart (`last_owned`): they are the shards whose local state is freshest."""
        path = self.data_dir / owned_file
        with contextlib.suppress(OSError):
            self.data_dir.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_text(json.dumps(sorted(self.owned)))
            path.with_suffix(".tmp").replace(path)

    def last_owned(self) -> set[int]:
        """The shards this worker served at its last assignment, in this run or the
        previous one; none when that was never written down, or cannot be read."""
        try:
            shards = json.loads((self.data_dir / owned_file).read_text())
            return {p for p in shards if isinstance(p, int)}
        except (OSError, ValueError, TypeError):
            return set()

    async def _committed(self, tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        """The group's committed offsets of `tps`, once no open transaction holds offsets
        for them."""
        assert self.consumer is not None
        return await stable_committed(self.consumer, self.group_id, tps, timeout_s=stable_timeout_s)

    async def _recover(
        self, shards: list[int], *, ready: Callable[[list[int]], Awaitable[None]] | None = None
    ) -> None:
        await recover(
            self.bootstrap,
            self.changelog,
            shards,
            store=self.store,
            counts=self.counts,
            ready=ready,
        )

    # The producer ------------------------------------------------------------------------

    async def new_producer(self) -> None:
        """The worker's producer, new: initialising its transactional id ends the open
        transaction of the producer it replaces (or of this worker's previous process),
        aborting it, or completing a commit already decided."""
        await self.drop_producer()
        producer = durable_producer(
            self.bootstrap,
            transactional_id=(
                f"{self.group_id}-worker-{self.instance_id}" if self.exactly_once else None
            ),
            transaction_timeout_ms=transaction_timeout_ms,
            linger_ms=5,
            max_batch_size=512 * 1024,
            # Kafka >= 3.8 refuses a transaction's first batch to a partition with a
            # retriable NOT_ENOUGH_REPLICAS when its check that the partition is in the
            # transaction (KIP-890, see aio-libs/aiokafka#1172) meets another change or
            # check of the same transaction (`streams.transaction` orders its requests
            # so that none do), and a leader or coordinator moving answers retriably
            # too. The default 100 ms backoff would stall the worker. 2 ms was tried
            # (when the requests were not yet ordered so): 5,551/s against 9,249/s with 10
            # at 64 partitions (`tally bench engine --count 100000`, back to back), the
            # retries of a transaction touching ~190 partitions spinning the worker.
            retry_backoff_ms=10,
        )
        kafka_internals.begin_transactions_sooner(transaction_begin_backoff_s)
        member_offsets = MemberOffsets(producer) if self.exactly_once else None
        try:
            await producer.start()
        except BaseException:
            # (Cancelled with a take-over, or the broker is away: not left open.)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), producer_stop_timeout_s)
            raise
        self.producer, self.member_offsets = producer, member_offsets

    async def drop_producer(self) -> None:
        producer, self.producer, self.member_offsets = self.producer, None, None
        if producer is not None:
            # Bounded: a producer whose broker is gone can wait long for its batches.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), producer_stop_timeout_s)

    def forget(self, p: int) -> None:
        """Drop what shard p's store has staged and not committed."""
        store = self.stores.get(p)
        if store is not None:
            store.discard()

    # Losing and retaking shards ----------------------------------------------------------

    def forget_unowned(self) -> None:
        self.watchdog.assigned(
            [k for k in self.watchdog.partitions if k[1] in self.owned], time.monotonic()
        )

    def give_up(self, shards: set[int]) -> None:
        """The group refused a transaction's offsets: it has moved these shards on, or is
        moving them, and this worker is not the member it was. Stop serving them and ask
        the group for a new assignment; a shard assigned here again is taken over afresh
        (its store and offsets read back from Kafka), as after any gap in generations."""
        log.warning("shards %s: the group refused their offsets; giving them up", sorted(shards))
        self.counts["fenced"] += 1
        self.owned -= shards
        for p in shards:
            self.forget(p)
        self.forget_unowned()
        kafka_internals.request_rejoin(self.consumer)

    async def reclaim(self, shards: set[int]) -> None:
        """Take these shards over again, as a new owner would, after a transaction whose
        outcome is unknown: a new producer (its transactional id initialised, which ends
        the failed transaction one way or the other), each shard's store caught up from
        the changelog, and the consumer put back at the committed offsets. Whatever the
        failed transaction did or did not commit, the shards then continue from what
        Kafka has. Retried, with backoff, until the broker answers: a broker restart must
        not end the worker."""
        assert self.consumer is not None
        self.recovering |= shards
        delay = reclaim_backoff_first_s
        try:
            while True:
                here = {tp.partition for tp in self.consumer.assignment()}
                for p in shards - here:
                    # No longer assigned here (the group moved it): its new owner reads it.
                    self.owned.discard(p)
                    self.forget(p)
                shards = shards & here
                self.forget_unowned()
                if not shards:
                    return
                try:
                    await self.new_producer()
                    await self._recover(sorted(shards))
                    await self._rewind(shards)
                    self.counts["reclaimed"] += len(shards)
                    log.info("shards %s: taken over again; serving", sorted(shards))
                    return
                except (KafkaError, OSError, TimeoutError) as exc:
                    # The broker is not back yet. Anything else (a broken store) is not
                    # waited out: it ends the worker.
                    if self.stopping.is_set():
                        raise
                    log.warning(
                        "shards %s: cannot take them over yet (%r); retrying", sorted(shards), exc
                    )
                    await self.drop_producer()
                    await asyncio.sleep(delay)
                    delay = min(reclaim_backoff_max_s, delay * 2)
        finally:
            self.recovering -= shards

    async def _rewind(self, shards: set[int]) -> None:
        """Put the consumer back at these shards' committed offsets."""
        assert self.consumer is not None
        tps = sorted(tp for tp in self.consumer.assignment() if tp.partition in shards)
        await self._seek(await self._committed(tps))

    async def _seek(self, committed: dict[TopicPartition, int | None]) -> None:
        """Apply each partition from its committed offset (from its beginning when it
        has none)."""
        assert self.consumer is not None
        here = self.consumer.assignment()
        at = {}
        for tp, offset in sorted(committed.items()):
            if tp not in here:
                continue
            at[f"{tp.topic}[{tp.partition}]"] = offset
            if offset is None:
                self.next.pop(tp, None)
                await self.consumer.seek_to_beginning(tp)
            else:
                self.next[tp] = offset
                self.consumer.seek(tp, offset)
        if at:
            log.info("resuming at %s", at)

    async def close(self) -> None:
        await self.stop_taking()
        await self.drop_producer()
        for store in self.stores.values():
            store.discard()
            store.close()
        self.stores.clear()
        self.owned.clear()
        self.held.clear()


async def _nothing_in_flight() -> set[int]:
    return set()


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """The group's rebalance callbacks, handed to the shards (unless the group refused this
    worker, which then serves nothing: see `streams.agreement`)."""

    def __init__(self, shards: Shards, refused: Callable[[], bool]) -> None:
        self.shards = shards
        self.refused = refused

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.shards.revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.refused():
            return  # never ready: it serves nothing and is stopping
        await self.shards.assigned(assigned)
