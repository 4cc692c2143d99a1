"""The engine worker: consumes the commands and internal topics in one consumer group and
applies each shard's records in order, a batch at a time, in one Kafka transaction.

`Engine` is the façade the worker process, its web endpoints and the tests construct; the
work is done in rooms of their own:

- `streams.loop`: the batch loop, one transaction per shard batch, poison isolation;
- `streams.transaction`: the transaction's commit order, written down once;
- `streams.records`: what one consumed record becomes (decided, forwarded, rejected,
  dead-lettered);
- `streams.ownership`: shard ownership (assign, revoke, fence, reclaim);
- `streams.placement`: where each shard and its standby copies go, decided by the group
  leader's assignor (`streams.agreement`) at every rebalance, sticky and deterministic;
- `streams.recovery`: catching a shard's store up from its changelog, and standby;
- `streams.timers`: hold expiry and idempotency pruning;
- `streams.kafka_internals`: the aiokafka internals the engine reads, pinned by a test.

This module keeps the life cycle (consume until stopped), the engine's clock, the
watchdog's view of each partition, and the reads the table views serve.

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

Why not Faust. faust-streaming 0.15 drove the first version of this engine. Its
consumer can commit an offset past a record still in flight (the gap check in
`faust/transport/consumer.py`'s `_new_offset`, faust-streaming/faust#606), so under
`kill -9` commands went without a result. This loop keeps the same model (one owner per
partition, RocksDB tables, compacted changelogs, transactions) with the batch and the
transaction boundaries in our hands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer

from core.settings import Settings
from streams import agreement, kafka_internals, ownership
from streams.loop import BatchLoop
from streams.ownership import Listener, Shards
from streams.placement import Claim
from streams.records import Records
from streams.recovery import standby
from streams.state import BalanceState
from streams.store import ShardStore
from streams.timers import HoldExpiries, Pruning
from streams.watchdog import Watchdog
from topics.names import changelog_name, deployment_topics, engine_group, engine_instance
from topics.shard import shard_of
from topics.specs import Topics

log = logging.getLogger(__name__)

# One poll gathers up to this many records over every assigned partition; each shard's
# share is one transaction. Bigger batches amortise the transaction's round trips and
# per-batch work, which is where a worker drained a backlog slowest: with 200,000 commands
# on 8 partitions, a drain took 13.2-13.8 s at 20,000 and 9.0-10.2 s at 128,000, for
# 47 MB more peak memory (287 -> 334 MB RSS). A worker that keeps up polls far fewer
# records than this, so the bound does not lengthen the paced produce->result latency.
poll_max_records = 128_000
poll_timeout_ms = 100
# Group membership is static (KIP-345): each worker joins under its instance id
# (`instance_id`), so one that restarts within the session timeout gets its shards back
# with no rebalance at all, and the other workers never stop; a worker that does not
# come back within it has its shards moved. A clean stop leaves the group at once, to
# hand its shards over (see `kafka_internals.become_dynamic`).
session_timeout_ms = 10_000
# How soon a worker hears of a rebalance (a heartbeat's answer says one is under way):
# the kept shards stop from then until the new assignment, so this bounds their pause.
heartbeat_interval_ms = 500
max_poll_interval_ms = 300_000
# Counted by recovery, the standby replica, a rebuilt local store and the group's
# assignments (see `counts` and `streams.ownership`), at 0 from the start.
startup_counters = (
    "recovered_records",
    "rebuilt_shards",
    "standby_records",
    "assignments",
    "kept_shards",
    "taken_shards",
)
# Pruning needs the engine's clock to agree with the broker's within this, as seen by a
# commit no older than clock_check_fresh_s (see the module's docstring).
clock_skew_max_ms = 60_000
clock_check_fresh_s = 60.0


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
        # The recovery counters exist from the start, at 0, so that /readyz tells "none
        # read" from "no such counter" (the recovery tests read them by name).
        self.counts: Counter[str] = Counter(dict.fromkeys(startup_counters, 0))
        # Batches, rebalances, the standby and the table views' reads take turns.
        self.lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self.watchdog = Watchdog()
        self.expiries = HoldExpiries(self.partitions)
        self.pruning = Pruning(self.retention_ms, self.counts, self._clock_agrees)
        self.records = Records(self.topics, self.partitions, self.counts, self.expiries.watch)
        self.shards = Shards(
            bootstrap=settings.kafka_bootstrap,
            group_id=self.group_id,
            changelog=self.changelog,
            data_dir=self.data_dir,
            exactly_once=self.exactly_once,
            lock=self.lock,
            stopping=self._stopping,
            counts=self.counts,
            watchdog=self.watchdog,
            expiries=self.expiries,
            instance_id=engine_instance(settings),
            on_duplicate=self._duplicate,
        )
        self.loop = BatchLoop(
            shards=self.shards,
            records=self.records,
            expiries=self.expiries,
            pruning=self.pruning,
            exactly_once=self.exactly_once,
            group_id=self.group_id,
            changelog=self.changelog,
            counts=self.counts,
            poll_max_records=poll_max_records,
            now_ms=self._now_ms,
            time_ms=self._time_ms,
            check_clock=self._check_clock,
        )
        self.shards.drain = self.loop.drain
        # Set when the group refused this worker's settings (see `streams.agreement`).
        self.refused: str | None = None
        self.instance_id = engine_instance(settings)
        self.assignor = agreement.AgreeingAssignor(
            agreement.terms(settings),
            started_ms=self._now_ms(),
            on_refused=self._refuse,
            instance=self.instance_id,
            holdings=self._holdings,
            replicas=settings.table_standby_replicas,
        )

    # What the worker's web endpoints and the tests look at, owned by `self.shards`.

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        return self.shards.consumer

    @property
    def stores(self) -> dict[int, ShardStore]:
        return self.shards.stores

    @property
    def owned(self) -> set[int]:
        return self.shards.owned

    @property
    def recovering(self) -> set[int]:
        return self.shards.recovering

    @property
    def ready(self) -> bool:
        """Serving: assigned at least once and no shard still recovering."""
        return self.shards.assigned_once.is_set() and not self.shards.recovering

    # Life cycle --------------------------------------------------------------------------

    async def run(self, *, client_id: str = "tally-engine") -> None:
        """Consume and apply until `stop()`. An infrastructure error that cannot be
        rolled back ends the run with the exception; nothing half-done is kept."""
        consumer = self.shards.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=self.group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            # The placement keeps partition p of both topics on one worker (they are one
            # shard), moves as few as it can, and gives shards only to the workers that
            # agree with the group's settings (`streams.agreement`, `streams.placement`).
            partition_assignment_strategy=(self.assignor,),
            group_instance_id=self.instance_id,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            max_poll_interval_ms=max_poll_interval_ms,
        )
        consumer.subscribe(
            [self.topics.commands.name, self.topics.internal.name],
            listener=Listener(self.shards, refused=lambda: self.refused is not None),
        )
        warm = self._standby() if self.settings.table_standby_replicas > 0 else None
        try:
            await consumer.start()
            # In a session, idle shards are left out of each fetch's request and answer
            # (`streams.fetch_session`).
            if kafka_internals.use_fetch_sessions(consumer) is None:
                log.warning("aiokafka's fetcher is not where expected: fetching without sessions")
            while not self._stopping.is_set():
                polled = await consumer.getmany(
                    timeout_ms=poll_timeout_ms, max_records=poll_max_records
                )
                async with self.lock:
                    await self.loop.process(polled)
                self._observe()
                self.shards.check()  # a take-over that failed ends the run with its error
                if warm is not None and warm.done():
                    warm.result()  # a failed standby ends the run with its error
        finally:
            if warm is not None:
                warm.cancel()
                await asyncio.gather(warm, return_exceptions=True)
            await self._shutdown()
        if self.refused is not None:
            raise agreement.Disagreement(self.refused)

    def _standby(self) -> asyncio.Task[None]:
        return asyncio.create_task(
            standby(
                self.settings.kafka_bootstrap,
                self.changelog,
                lock=self.lock,
                stopping=self._stopping,
                busy=self.shards.busy,
                placed=lambda: self.assignor.standby,
                store=self.shards.store,
                counts=self.counts,
            ),
            name="standby",
        )

    def stop(self) -> None:
        self._stopping.set()

    async def _shutdown(self) -> None:
        await self.shards.stop_taking()
        async with self.lock:
            await self.loop.drain()
            if self.consumer is not None:
                kafka_internals.become_dynamic(self.consumer)
                with contextlib.suppress(Exception):
                    await self.consumer.stop()
            await self.shards.close()

    def _holdings(self) -> Claim:
        """What this worker claims when it joins: the shards it serves (or holds through
        the rebalance), those its standby keeps warm, those it served at its last
        assignment (after a restart: before it stopped, so their state is fresh), and
        those it has any local store of."""
        return Claim(
            owned=frozenset(self.shards.holdings()),
            warm=self.assignor.standby,
            recent=frozenset(self.shards.last_owned()),
            stored=frozenset(self.shards.stored()),
        )

    def _refuse(self, verdict: agreement.Verdict) -> None:
        """The group gave this worker no shard because a setting differs: say which."""
        self._stop_refused(agreement.refusal(verdict, self.group_id))

    def _duplicate(self) -> None:
        """Expelled from the group again and again: another worker runs under this
        worker's instance id. Stop, saying so, so that the other keeps the shards
        instead of both taking them from each other."""
        self._stop_refused(
            f"this worker stops: it was expelled from the group {self.group_id} "
            f"{ownership.expelled_max} times within {ownership.expelled_window_s:.0f} s, "
            f"so another worker runs under its instance id {self.instance_id!r}; give "
            "each worker its own TALLY_ENGINE_INSTANCE_ID (or leave it empty: host "
            "name and data directory)"
        )

    def _stop_refused(self, why: str) -> None:
        """Say why this worker takes no part in the group, once, and stop (the run then
        ends with `agreement.Disagreement`)."""
        if self.refused is None:
            self.refused = why
            log.error("%s", why)
        self.stop()

    # The engine's clock ------------------------------------------------------------------

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

    # Watchdog ----------------------------------------------------------------------------

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
            position = kafka_internals.position_now(consumer, tp)
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
        clients from its Kafka commit, and its RocksDB write follows the commit in the
        background (`BatchLoop.in_flight`); a view that reads under the lock, once the
        transaction in flight has ended, therefore shows every result a client can
        already have seen (read-your-writes)."""
        async with self.lock:
            await self.loop.quiet()
            yield
