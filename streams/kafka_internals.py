"""Every read of aiokafka's private internals the engine makes, in one place.

aiokafka has no public call for these things the engine needs: why a producer's sender
stopped, asking the group for a rebalance, a partition's position without waiting for an
offset reset, the group generation and member id it joined as, whether a rebalance is
under way, leaving the group as a static member, the group's coordinator and the
consumer's client (to send it requests aiokafka has not got, `streams.group_commit`),
sending a transaction's offsets with another handler, failing a transaction so that its
abort reaches the broker, how soon a transaction begun during the previous one's
markers asks again, and fetching in incremental fetch sessions (`streams.fetch_session`).
Each reads (or sets) an internal attribute and falls back quietly when it is missing, so
that a worker never breaks on it; `tests/unit/streams/test_kafka_internals.py` pins every
one of them against the installed aiokafka, so an upgrade that moves them fails there,
loudly, instead of degrading in production.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.client import CoordinationType
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.errors import GroupAuthorizationFailedError
from aiokafka.producer import sender as sender_module
from aiokafka.producer.transaction_manager import TransactionState
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.structs import TopicPartition

from streams.fetch_session import FetchSession, Plan


@dataclass(frozen=True)
class GroupMember:
    """Who commits a transaction's offsets: the member and generation it joined as."""

    generation: int
    member_id: str
    instance_id: str | None


def sender_error(producer: AIOKafkaProducer | None) -> BaseException | None:
    """The exception the producer's background sender stopped with, if it did (a fenced
    producer's sender stops with ProducerFenced, and a batch may then fail with a plainer
    error). Reads `producer._sender.sender_task`."""
    try:
        task = producer._sender.sender_task  # type: ignore[union-attr]
        if task.done() and not task.cancelled():
            error: BaseException | None = task.exception()
            return error
    except AttributeError:
        pass
    return None


def request_rejoin(consumer: AIOKafkaConsumer | None) -> None:
    """Ask the group coordinator for a rebalance. (aiokafka has no public call for it;
    its coordinator's `request_rejoin` is what a subscription change uses.)"""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is not None and hasattr(coordinator, "request_rejoin"):
        coordinator.request_rejoin()


def position_now(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's position of `tp` if it has one, without waiting. (aiokafka's
    `position()` waits for an offset reset; the watchdog must never hold the loop, so
    this reads the same subscription state `position()` reads.)"""
    try:
        state = consumer._subscription.subscription.assignment.state_value(tp)
        return int(state.position) if state.has_valid_position else None
    except (AttributeError, KeyError, TypeError):
        return None


def generation(consumer: AIOKafkaConsumer | None) -> int | None:
    """The group generation this consumer last joined, or None before it joined (or
    when the attribute is missing). Kafka's classic group protocol adds exactly one per
    rebalance, which is what tells a shard kept across one rebalance from a shard that
    could have been another worker's in between (`streams.ownership`). Reads
    `consumer._coordinator.generation`."""
    value = getattr(getattr(consumer, "_coordinator", None), "generation", None)
    return value if isinstance(value, int) and value > 0 else None


def become_dynamic(consumer: AIOKafkaConsumer | None) -> bool:
    """Make the consumer a dynamic member from its next request on: its `stop()` then
    sends LeaveGroup, and its next join takes no instance id. aiokafka never sends
    LeaveGroup for a member with a `group_instance_id` (the point of static membership
    is that a restart within the session timeout gets the same shards back with no
    rebalance), but a worker stopped on purpose should hand its shards over at once, and
    one that found another process under its instance id must stop expelling it. A
    LeaveGroup by member id removes a static member too (Kafka's coordinator drops its
    instance id with it). Clears `consumer._coordinator._group_instance_id`; False when
    it is missing."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "_group_instance_id"):
        return False
    coordinator._group_instance_id = None
    return True


def member(consumer: AIOKafkaConsumer | None) -> GroupMember | None:
    """Who this consumer is in its group now: its generation, member id and instance id
    (for the generation-checked offsets of a transaction, `streams.group_commit`), or None
    before it joined. Reads `consumer._coordinator.generation`, `.member_id` and
    `._group_instance_id`."""
    coordinator = getattr(consumer, "_coordinator", None)
    member_id = getattr(coordinator, "member_id", None)
    instance_id = getattr(coordinator, "_group_instance_id", None)
    number = generation(consumer)
    if number is None or not isinstance(member_id, str) or not member_id:
        return None
    return GroupMember(number, member_id, instance_id if isinstance(instance_id, str) else None)


def client(consumer: AIOKafkaConsumer) -> AIOKafkaClient:
    """The consumer's own client (its connections to the brokers). Reads `consumer._client`."""
    found: AIOKafkaClient = consumer._client
    return found


async def group_coordinator(consumer: AIOKafkaConsumer) -> int:
    """The broker that coordinates the consumer's group, found first if unknown. Calls
    `consumer._coordinator.ensure_coordinator_known()` and reads `.coordinator_id`."""
    coordinator = consumer._coordinator
    await coordinator.ensure_coordinator_known()
    node_id: int = coordinator.coordinator_id
    return node_id


def coordinator_dead(consumer: AIOKafkaConsumer) -> None:
    """Forget the group's coordinator (it answered NOT_COORDINATOR, say): the next request
    finds it again. Calls `consumer._coordinator.coordinator_dead()`."""
    consumer._coordinator.coordinator_dead()


def commit_offsets_with(
    producer: AIOKafkaProducer, handler: Callable[[Any, Any, str], Any]
) -> None:
    """Make the producer send a transaction's offsets with `handler(sender, offsets,
    group_id)`, a TxnOffsetCommit handler (`streams.group_commit`), instead of aiokafka's
    v0 one. Replaces `producer._sender._do_txn_offset_commit`, keeping what it does
    around the handler: nothing to do for no offsets, and the group coordinator found
    first."""
    sender = producer._sender

    async def _do_txn_offset_commit(offsets: Any, group_id: str) -> None:
        if not offsets:
            return
        try:
            node_id = await sender._find_coordinator(CoordinationType.GROUP, group_id)
        except GroupAuthorizationFailedError as exc:
            sender._txn_manager.error_transaction(exc)
            return
        await handler(sender, offsets, group_id).do(node_id)

    sender._do_txn_offset_commit = _do_txn_offset_commit


def reassigning(consumer: AIOKafkaConsumer | None) -> bool:
    """Whether the group is between a revocation and the next assignment (a `getmany`
    would wait for the assignment). True when it cannot be told, so that a caller that
    must not wait does not poll. Reads `consumer._subscription.reassignment_in_progress`."""
    try:
        return bool(consumer._subscription.reassignment_in_progress)  # type: ignore[union-attr]
    except AttributeError:
        return True


def begin_transactions_sooner(backoff_s: float) -> None:
    """Retry a transaction's first AddPartitionsToTxn every `backoff_s` while the
    coordinator answers CONCURRENT_TRANSACTIONS (it is still writing the previous
    transaction's markers, KAFKA-5477), instead of aiokafka's fixed 20 ms. Process-wide:
    sets `aiokafka.producer.sender.BACKOFF_OVERRIDE`, which aiokafka reads only for that
    answer to a transaction's first partitions."""
    sender_module.BACKOFF_OVERRIDE = backoff_s


def fail_transaction(sender: Any, error: BaseException) -> None:
    """Fail the producer's transaction with `error`, to be aborted, keeping what it has
    added to the broker's transaction. aiokafka's own `error_transaction` forgets the
    partitions and the group added, and its abort then sees an empty transaction and
    sends no EndTxn: the broker's transaction stays open, and the producer's next one
    joins it and commits its records too (seen on the broker by
    tests/integration/test_group_commit.py). Moves `sender._txn_manager` to
    ABORTABLE_ERROR and fails the offsets waiting and the transaction's waiter, as
    `error_transaction` does, without clearing `_txn_partitions` or
    `_txn_consumer_group`."""
    txn_manager = sender._txn_manager
    txn_manager._transition_to(TransactionState.ABORTABLE_ERROR)
    for _, _, future in txn_manager._pending_txn_offsets:
        future.set_exception(error)
    txn_manager._pending_txn_offsets.clear()
    waiter = txn_manager._transaction_waiter
    if not waiter.done():
        waiter.set_exception(error)
        # The caller learns of it through the offsets' future; the waiter holding it too
        # is not an error lost.
        waiter.exception()


class SessionFetchRequest(FetchRequest):  # type: ignore[misc]
    """A fetch request aiokafka's fetcher made, sent in its node's fetch session: from
    v7 on it carries the session's id and epoch, lists only the partitions `plan` names
    and forgets the ones it drops (`streams.fetch_session`). `topics` stays everything
    the fetcher asked for, which is what the fetcher matches the answer against: the
    session's partitions are exactly those."""

    def __init__(self, asked: FetchRequest, session: FetchSession) -> None:
        super().__init__(
            asked._max_wait_ms,
            asked._min_bytes,
            asked._max_bytes,
            asked._isolation_level,
            asked.topics,
            rack_id=asked._rack_id,
        )
        self.session = session
        self.plan: Plan | None = None

    def build(self, request_struct_class: Any) -> Any:
        version = request_struct_class.API_VERSION
        if version < 7:  # no sessions before v7: a full fetch, as aiokafka sends it
            return super().build(request_struct_class)
        wanted = [
            (TopicPartition(topic, partition), offset, max_bytes)
            for topic, partitions in self.topics
            for partition, offset, max_bytes in partitions
        ]
        plan = self.plan = self.session.plan(wanted)
        listed = [(tp, _partition(tp, offset, size, version)) for tp, offset, size in plan.send]
        args: list[Any] = [
            -1,  # replica_id: a consumer
            self._max_wait_ms,
            self._min_bytes,
            self._max_bytes,
            self._isolation_level,
            plan.session_id,
            plan.epoch,
            _by_topic(listed),
            _by_topic([(tp, tp.partition) for tp in plan.forget]),
        ]
        if version >= 11:
            args.append(self._rack_id)
        return request_struct_class(*args)


def _partition(tp: TopicPartition, offset: int, max_bytes: int, version: int) -> tuple[int, ...]:
    """A partition's entry in a fetch request, as aiokafka's own FetchRequest writes it:
    v9+ adds current_leader_epoch (-1: unknown), the log start offset is -1 (a consumer)."""
    if version >= 9:
        return (tp.partition, -1, offset, -1, max_bytes)
    return (tp.partition, offset, -1, max_bytes)


def _by_topic(items: list[tuple[TopicPartition, Any]]) -> list[tuple[str, list[Any]]]:
    grouped: dict[str, list[Any]] = {}
    for tp, item in items:
        grouped.setdefault(tp.topic, []).append(item)
    return list(grouped.items())


class _SessionClient:
    """The fetcher's view of the consumer's client: a session fetch's answer (or its
    failure) is told to its session before the fetcher reads it; everything else is the
    client itself."""

    def __init__(self, client: AIOKafkaClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def send(self, node_id: int, request: Any, **kwargs: Any) -> Any:
        if not isinstance(request, SessionFetchRequest):
            return await self._client.send(node_id, request, **kwargs)
        try:
            response = await self._client.send(node_id, request, **kwargs)
        except BaseException:
            if request.plan is not None:
                request.session.failed(request.plan)
            raise
        if request.plan is not None:
            request.session.answered(request.plan, response.error_code, response.session_id)
        return response


def use_fetch_sessions(consumer: AIOKafkaConsumer) -> dict[int, FetchSession] | None:
    """Make a started consumer fetch in incremental fetch sessions, one per broker
    (`streams.fetch_session`), and return them by node id (filled as the fetcher meets
    each broker); None, and the consumer fetches as before, when aiokafka's fetcher is
    not where this looks. Wraps `consumer._fetcher._get_actions_per_node` (the requests
    it returns become SessionFetchRequests) and puts a `_SessionClient` over
    `consumer._fetcher._client`."""
    fetcher = getattr(consumer, "_fetcher", None)
    actions = getattr(fetcher, "_get_actions_per_node", None)
    if not isinstance(fetcher, Fetcher) or actions is None or not hasattr(fetcher, "_client"):
        return None
    sessions: dict[int, FetchSession] = {}

    def get_actions_per_node(assignment: Any) -> Any:
        fetch_requests, *rest = actions(assignment)
        in_sessions = [
            (node_id, SessionFetchRequest(request, sessions.setdefault(node_id, FetchSession())))
            for node_id, request in fetch_requests
        ]
        return (in_sessions, *rest)

    fetcher._get_actions_per_node = get_actions_per_node
    fetcher._client = _SessionClient(fetcher._client)
    return sessions
