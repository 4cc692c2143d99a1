"""The engine's Faust app: one agent over the commands and internal topics, four tables,
the hold-expiry timer and the table view.

Per record, in partition order: decode; dead-letter what has no usable command_id;
forward what sits on the wrong partition; otherwise `ledger.apply` against the tables,
write the outcome to the tables, the result to the events topic and the emitted internal
commands to their shards' partitions of the internal topic.

Exactly-once: with `processing_guarantee="exactly_once"` Faust runs one transactional
producer per source partition and commits the consumed offsets, the changelog records
and what we produce in that partition's transaction. Faust picks the producer by the
*destination* partition of each record, which is wrong for records that leave the shard
(credits to another shard, forwarded commands) and fails for topics the engine does not
consume (events, dead letters). So every record the agent produces goes out through
`_send`, which names the source partition's transactional producer itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import time
from collections import Counter
from typing import Any

import faust
from mode import CrashingSupervisor

from streams import ledger
from streams.tables import TABLE_NAMES, TableState
from tally.settings import Settings
from topics import limits
from topics.codec import Invalid, Undecodable, decode_command, encode
from topics.schema import Command, DeadLetter, Expire, Hold, InternalCommand
from topics.shard import shard_of
from topics.specs import Topics, TopicSpec, changelog_spec, topics_for

log = logging.getLogger(__name__)

# How often the hold-expiry timer looks for holds whose time has passed.
expiry_check_interval_s = 1.0
expiry_rescan_every_ticks = 30
# Producer batching: records of one partition wait this long to share a request.
producer_linger_s = 0.005
producer_max_batch_bytes = 512 * 1024
session_timeout_s = 10.0
heartbeat_interval_s = 2.0


class Engine:
    """The Faust app of one engine worker, built from settings."""

    def __init__(self, settings: Settings, *, app_id: str | None = None) -> None:
        self.settings = settings
        self.topics: Topics = self.topics_of(settings)
        self.partitions = settings.partitions
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        self.app: Any = faust.App(
            app_id or self.app_id_of(settings),
            broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
            # faust picks rocksdict for "rocksdb://" when it is installed (it is a dependency).
            store="rocksdb://",
            datadir=settings.data_dir,
            processing_guarantee=settings.processing_guarantee,
            topic_partitions=settings.partitions,
            topic_replication_factor=1,
            topic_allow_declare=True,
            web_host="127.0.0.1",
            web_port=settings.web_port,
            web_enabled=True,
            producer_linger=producer_linger_s,
            producer_max_batch_size=producer_max_batch_bytes,
            producer_acks=-1,
            # A killed worker's partitions are reassigned once its session expires; the
            # default minute would stall every partition it held for that long.
            broker_session_timeout=session_timeout_s,
            broker_heartbeat_interval=heartbeat_interval_s,
        )
        self.source = self.app.topic(
            self.topics.commands.name,
            self.topics.internal.name,
            key_serializer="raw",
            value_serializer="raw",
        )
        tables = {
            # bytes key and value types make faust store and log them as they are.
            name: self.app.Table(
                name,
                partitions=settings.partitions,
                key_type=bytes,
                value_type=bytes,
            )
            for name in TABLE_NAMES
        }
        app_id_used = self.app.conf.id
        self.state = TableState(
            tables, {name: f"{app_id_used}-{name}-changelog" for name in TABLE_NAMES}
        )
        self.counts: Counter[str] = Counter()
        self._expiry_heap: list[tuple[int, str, str]] = []
        self._expiry_known: set[tuple[int, str, str]] = set()
        self._expiry_ticks = 0
        # An exception that escapes `handle` is an infrastructure failure (the ledger's
        # own errors are caught there). Restarting just the agent, faust's default, would
        # go on past a record whose table writes may be half done; crashing the worker
        # aborts the open transactions and makes the next start restore from changelogs.
        self.app.agent(self.source, name="engine", supervisor_strategy=CrashingSupervisor)(
            self._process
        )
        self.app.timer(expiry_check_interval_s)(self._expire_holds)
        self._gate = asyncio.Lock()
        self.app.task(self._install_commit_gate)
        self.app.page("/balances/{account}/")(
            self.app.table_route(table=tables["balances"], match_info="account")(self._view)
        )

    @staticmethod
    def topics_of(settings: Settings) -> Topics:
        return topics_for(settings.topic_prefix, settings.partitions)

    @staticmethod
    def app_id_of(settings: Settings) -> str:
        return f"{settings.topic_prefix}-engine"

    @staticmethod
    def all_topic_specs(settings: Settings, app_id: str) -> list[TopicSpec]:
        """Every topic the engine needs, changelogs included. They are created before
        faust starts: faust creates changelogs itself, but an agent that writes a table
        before the new changelog shows up in its metadata crashes (PartitionsMismatch)."""
        changelogs = [
            changelog_spec(f"{app_id}-{table}-changelog", settings.partitions)
            for table in TABLE_NAMES
        ]
        return [*Engine.topics_of(settings).all(), *changelogs]

    # The agent ---------------------------------------------------------------------------

    async def _process(self, stream: Any) -> None:
        async for event in stream.events():
            # Shielded: a worker stopping mid-record finishes the record before the final
            # commit, instead of committing half of its outputs.
            await asyncio.shield(self._handle_atomically(event))

    async def _handle_atomically(self, event: Any) -> None:
        """One record's outputs and its offset land in the same transaction.

        faust commits on a timer (and on rebalance and stop), concurrently with the agent.
        A commit that fell between a record's first output and its ack would put those
        outputs in a committed transaction while the record's offset stays uncommitted:
        after a crash the record is processed again on top of its own effects. So the
        record is handled (every output handed to the transactional producer) and acked
        under a gate that every commit also takes."""
        async with self._gate:
            await self.handle(event)
            event.ack()

    async def _install_commit_gate(self) -> None:
        """Make every faust commit (timer, rebalance, stop) wait for the record in hand.
        faust offers no hook for this, so the consumer's commit method is wrapped."""
        consumer = self.app.consumer
        force_commit = consumer.force_commit

        async def gated_force_commit(*args: Any, **kwargs: Any) -> bool:
            async with self._gate:
                return bool(await force_commit(*args, **kwargs))

        consumer.force_commit = gated_force_commit

    async def handle(self, event: Any) -> None:
        """Decide one record of the commands or internal topic."""
        message = event.message
        partition: int = message.partition
        internal = message.topic == self.topics.internal.name
        decoded = decode_command(message.value or b"", internal=internal)
        now_ms = int(message.timestamp * 1000)
        if isinstance(decoded, Undecodable):
            await self._dead_letter(message, decoded.reason, now_ms)
            return
        if isinstance(decoded, Invalid):
            outcome = ledger.reject_invalid(decoded, now_ms)
        else:
            owner = shard_of(decoded.account, self.partitions)
            if owner != partition:
                # Placed by a partitioner other than murmur2 (kcat's CRC32, say): apply
                # it only on its account's shard, or one balance would live in two.
                self.counts["forwarded"] += 1
                await self._send(message.topic, decoded.account, message.value, owner, partition)
                return
            try:
                outcome = ledger.apply(self.state, decoded, now_ms)
            except Exception as exc:
                # A bug in the rules must not stop the shard: the record is parked
                # with the error, nothing was written, and the next record goes on.
                log.exception("ledger failed on %s", decoded.command_id)
                await self._dead_letter(message, f"engine error: {exc!r}", now_ms)
                return
            for topic, key, value in self.state.commit(outcome):
                await self._send_raw(topic, key, value, partition, partition)
            self._track_expiry(decoded)
        for emitted in outcome.emits:
            await self._send(
                self.topics.internal.name,
                emitted.account,
                encode(emitted),
                shard_of(emitted.account, self.partitions),
                partition,
            )
        result = outcome.result
        self.counts[result.status.value] += 1
        await self._send(
            self.topics.events.name, result.account, encode(result), partition, partition
        )

    async def _dead_letter(self, message: Any, reason: str, now_ms: int) -> None:
        self.counts["dead_lettered"] += 1
        raw = message.value or b""
        letter = DeadLetter(
            reason=reason[: limits.DETAIL_LEN_MAX],
            source_topic=message.topic,
            source_partition=message.partition,
            source_offset=message.offset,
            key=None if message.key is None else message.key.decode("utf-8", "replace"),
            raw=raw.decode("utf-8", "backslashreplace"),
            at_ms=now_ms,
        )
        await self._send(
            self.topics.dead_letter.name,
            None,
            encode(letter),
            message.partition,
            message.partition,
        )

    async def _send(
        self, topic: str, key: str | None, value: bytes, partition: int, source: int
    ) -> None:
        """Produce one record inside the transaction of source partition `source`."""
        await self._send_raw(topic, None if key is None else key.encode(), value, partition, source)

    async def _send_raw(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int, source: int
    ) -> None:
        transactional_id = None
        if self.exactly_once:
            group = self.app.assignor.group_for_topic(self.topics.commands.name)
            transactional_id = f"{self.app.conf.id}-{group}-{source}"
        await self.app.producer.send(
            topic, key, value, partition, None, None, transactional_id=transactional_id
        )

    # Hold expiry -------------------------------------------------------------------------

    def _track_expiry(self, command: Command) -> None:
        if isinstance(command, Hold) and command.expires_at_ms is not None:
            self._watch((command.expires_at_ms, command.account, command.hold_id))

    def _watch(self, item: tuple[int, str, str]) -> None:
        if item not in self._expiry_known:
            self._expiry_known.add(item)
            heapq.heappush(self._expiry_heap, item)

    async def _expire_holds(self) -> None:
        """Ask each expired hold's shard to release it. The Expire command id is derived
        from the hold, so a repeat after a restart is answered as a duplicate."""
        # Holds of shards this worker took over (or restored) are found by a periodic
        # scan of the holds table; holds placed here are watched as they are applied.
        if self._expiry_ticks % expiry_rescan_every_ticks == 0:
            for account, hold_id, held in self.state.open_holds():
                if held.expires_at_ms is not None:
                    self._watch((held.expires_at_ms, account, hold_id))
        self._expiry_ticks += 1
        now_ms = int(time.time() * 1000)
        while self._expiry_heap and self._expiry_heap[0][0] <= now_ms:
            item = heapq.heappop(self._expiry_heap)
            self._expiry_known.discard(item)
            expires, account, hold_id = item
            digest = hashlib.blake2b(
                f"{account}|{hold_id}|{expires}".encode(), digest_size=16
            ).hexdigest()
            expire: InternalCommand = Expire(
                command_id=f"expire.{digest}", account=account, hold_id=hold_id
            )
            shard = shard_of(account, self.partitions)
            await self.app.producer.send(
                self.topics.internal.name,
                account.encode(),
                encode(expire),
                shard,
                None,
                None,
                transactional_id=None,
            )

    # The table view ----------------------------------------------------------------------

    async def _view(self, web_view: Any, request: Any, account: str) -> Any:
        balances = self.state.balances_of(account)
        return web_view.json(
            {
                "account": account,
                "shard_id": shard_of(account, self.partitions),
                "balances": {
                    asset: {"available": b.available, "held": b.held, "seq": b.seq}
                    for asset, b in balances.items()
                },
            }
        )
