"""Shard ownership: which shards this worker serves, and taking one on or giving it up.

Fencing: each shard has its own transactional producer, `transactional.id` =
`<group>-shard-<p>`. Whoever takes over a shard initialises that id first, which aborts
the previous owner's open transaction and fences it: a worker that was paused or cut off
can no longer commit anything for the shard. Only then is the shard's state caught up
from its changelog (`streams.recovery`) and its committed offsets read. The same three
steps, in the same order, take a shard on when the group assigns it (`assigned`) and
take it over again after a batch whose outcome is unknown (`reclaim`). A shard whose
transactional id was taken by another worker is given up (`give_up`).

Kept across a rebalance. The group's rebalances are eager: every member gives up every
partition before the new assignment, even those it gets back. A shard this worker owned
in generation G and is given again in generation G + 1 was nobody else's in between
(the classic protocol's generations count rebalances one by one, and each assigns a
partition to one member), so it is kept as it is: same producer, same store, same next
offsets, no fence and no catch-up. Only when the new generation is not G + 1 (this
worker missed one, for example it was expelled for a missed heartbeat and rejoined) is
every shard taken over afresh, because another worker may have owned it meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from streams.recovery import recover
from streams.store import ShardStore
from streams.timers import HoldExpiries
from streams.watchdog import Watchdog
from topics.producer import durable_producer

log = logging.getLogger(__name__)

producer_stop_timeout_s = 5.0
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
    """Whether a failed batch means the shard's transactional id was taken by another
    worker: ProducerFenced anywhere in the error's chain, or as the reason the producer's
    sender stopped (then the batch itself may fail with a plainer error)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ProducerFenced):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(kafka_internals.sender_error(producer), ProducerFenced)


class Shards:
    """The shards this worker owns, their stores and transactional producers, and where
    each of their source partitions is to be applied from."""

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
        on_duplicate: Callable[[], None] = lambda: None,
    ) -> None:
        self.bootstrap = bootstrap
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
        self.producers: dict[int, AIOKafkaProducer] = {}
        self.owned: set[int] = set()
        # Owned until the rebalance under way, and the generation they were owned in.
        self.held: set[int] = set()
        self.held_generation: int | None = None
        self.recovering: set[int] = set()
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
        producers, stores and next offsets until the assignment says whether they come
        back (see the module's docstring)."""
        async with self.lock:
            # A shard whose batch failed as the group changed is not kept: it is taken
            # over afresh if it comes back.
            for p in await self.drain():
                self.owned.discard(p)
                await self.drop_producer(p)
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
            for p in set(self.producers) - kept - self.owned:
                await self.drop_producer(p)
            for tp in list(self.next):
                if tp.partition not in kept | self.owned:
                    self.next.pop(tp, None)
            self.owned |= kept
            # Counted for /readyz: assignments received, shards kept through one, and
            # shards taken over (fenced and caught up).
            self.counts["assignments"] += 1
            self.counts["kept_shards"] += len(kept)
            new = sorted(shards - self.owned)
            self.counts["taken_shards"] += len(new)
            self.recovering |= set(new)
            try:
                # Fence the shard's previous owner before reading what it left behind.
                await asyncio.gather(*(self.new_producer(p) for p in new))
                await self._recover(new)
                await self._resume(sorted(tp for tp in assigned if tp.partition in new))
            finally:
                self.recovering -= set(new)
            self.owned |= set(new)
            self.expiries.rescan_soon()
            self.watchdog.assigned(
                [(tp.topic, tp.partition) for tp in assigned if tp.partition in self.owned],
                time.monotonic(),
            )
            self.assigned_once.set()
            self._note_owned()
            log.info("serving shards %s (kept %s)", sorted(self.owned), sorted(kept))

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

    async def _resume(self, tps: list[TopicPartition]) -> None:
        """Apply each of a new shard's partitions from its committed offset, read after the
        fence (so it is final)."""
        assert self.consumer is not None
        resume = {}
        for tp in tps:
            committed = await self.consumer.committed(tp)
            resume[f"{tp.topic}[{tp.partition}]"] = committed
            if committed is None:
                self.next.pop(tp, None)
            else:
                self.next[tp] = committed
        if resume:
            log.info("resuming at %s", resume)

    async def _recover(self, shards: list[int]) -> None:
        await recover(self.bootstrap, self.changelog, shards, store=self.store, counts=self.counts)

    # Producers ---------------------------------------------------------------------------

    async def new_producer(self, p: int) -> None:
        await self.drop_producer(p)
        producer = durable_producer(
            self.bootstrap,
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

    async def drop_producer(self, p: int) -> None:
        producer = self.producers.pop(p, None)
        if producer is not None:
            # Bounded: a producer whose broker is gone can wait long for its batches.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), producer_stop_timeout_s)
        store = self.stores.get(p)
        if store is not None:
            store.discard()

    # Losing and retaking a shard ---------------------------------------------------------

    def forget_unowned(self) -> None:
        self.watchdog.assigned(
            [k for k in self.watchdog.partitions if k[1] in self.owned], time.monotonic()
        )

    async def give_up(self, p: int) -> None:
        """Another worker initialised shard p's transactional id: it owns the shard now.
        Give it up, and ask the group for a new assignment, so that the group's view and
        the fencing agree again (if the group still assigns the shard here, it is taken
        over again from Kafka, fencing the other)."""
        log.warning("shard %d: fenced by a newer owner; giving it up", p)
        self.counts["fenced"] += 1
        self.owned.discard(p)
        self.forget_unowned()
        await self.drop_producer(p)
        kafka_internals.request_rejoin(self.consumer)

    async def reclaim(self, p: int) -> None:
        """Take shard p over again, as a new owner would: a new transactional producer
        (which fences any other holder of the shard's id and aborts its open
        transaction), the local store caught up from the changelog, and the consumer
        put back at the committed offsets. Whatever the failed batch did or did not
        commit, the shard then continues from what Kafka has. Retried, with backoff,
        until the broker answers: a broker restart must not end the worker."""
        assert self.consumer is not None
        self.recovering.add(p)
        delay = reclaim_backoff_first_s
        try:
            while True:
                if not any(tp.partition == p for tp in self.consumer.assignment()):
                    # No longer assigned here (the group moved it): taking it would
                    # fence its new owner.
                    self.owned.discard(p)
                    self.forget_unowned()
                    await self.drop_producer(p)
                    return
                try:
                    await self.new_producer(p)
                    await self._recover([p])
                    await self._rewind(p)
                    self.counts["reclaimed"] += 1
                    log.info("shard %d: taken over again; serving", p)
                    return
                except (KafkaError, OSError, TimeoutError) as exc:
                    # The broker is not back yet. Anything else (a broken store) is not
                    # waited out: it ends the worker.
                    if self.stopping.is_set():
                        raise
                    log.warning("shard %d: cannot take it over yet (%r); retrying", p, exc)
                    await self.drop_producer(p)
                    await asyncio.sleep(delay)
                    delay = min(reclaim_backoff_max_s, delay * 2)
        finally:
            self.recovering.discard(p)

    async def _rewind(self, p: int) -> None:
        """Put the consumer back at shard p's committed offsets."""
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            if tp.partition != p:
                continue
            committed = await self.consumer.committed(tp)
            if committed is None:
                self.next.pop(tp, None)
                await self.consumer.seek_to_beginning(tp)
            else:
                self.next[tp] = committed
                self.consumer.seek(tp, committed)

    async def close(self) -> None:
        for p in list(self.producers):
            await self.drop_producer(p)
        for store in self.stores.values():
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
