"""The aiokafka internals the engine reads (`streams.kafka_internals`) are where it looks,
in the installed aiokafka. Each reader falls back quietly when its internal is missing
(a worker must not break on it), so an aiokafka upgrade that moves one must fail here,
loudly, instead."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import ProducerFenced
from aiokafka.producer.sender import Sender

from streams import kafka_internals
from streams.kafka_internals import position_now as _position_now

# Nothing listens here: none of these tests talks to a broker.
NOWHERE = "127.0.0.1:1"


async def test_the_aiokafka_internals_the_engine_reads_are_where_it_looks() -> None:
    """The watchdog's position, the fencing check and the rejoin request read aiokafka
    internals (no public call exists); they fall back quietly when those are missing,
    so an aiokafka upgrade that moves them must fail here instead."""
    consumer = AIOKafkaConsumer(bootstrap_servers=NOWHERE)
    tp = TopicPartition("t", 0)
    consumer.assign([tp])
    assert _position_now(consumer, tp) is None  # assigned, no position yet
    consumer._subscription.subscription.assignment.state_value(tp).seek(42)
    assert _position_now(consumer, tp) == 42
    assert callable(GroupCoordinator.request_rejoin)
    assert isinstance(Sender.sender_task, property)
    producer = AIOKafkaProducer(bootstrap_servers=NOWHERE)
    assert isinstance(producer._sender, Sender)
    await producer.stop()
    await consumer.stop()


async def test_a_sender_stopped_by_fencing_is_read_from_a_real_producer() -> None:
    """`sender_error` reads `producer._sender.sender_task`: on a real producer whose
    sender stopped with ProducerFenced it returns that error (not the fallback's None)."""
    producer = AIOKafkaProducer(bootstrap_servers=NOWHERE)
    assert kafka_internals.sender_error(producer) is None  # never started: no task
    stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stopped.set_exception(ProducerFenced())
    stopped.exception()
    assert producer._sender.sender_task is None
    producer._sender._sender_task = stopped  # what Sender.start sets
    assert isinstance(kafka_internals.sender_error(producer), ProducerFenced)
    producer._sender._sender_task = None
    await producer.stop()


async def test_the_rejoin_request_reaches_the_group_coordinator() -> None:
    """`request_rejoin` finds the consumer's `_coordinator` and calls its
    `request_rejoin`, which takes no argument."""
    consumer = AIOKafkaConsumer(bootstrap_servers=NOWHERE, group_id="g")
    assert "_coordinator" in vars(consumer)  # set (to None) before start
    assert list(inspect.signature(GroupCoordinator.request_rejoin).parameters) == ["self"]

    class Coordinator:
        asked = 0

        def request_rejoin(self) -> None:
            self.asked += 1

    coordinator = Coordinator()
    consumer._coordinator = coordinator
    kafka_internals.request_rejoin(consumer)
    assert coordinator.asked == 1
    consumer._coordinator = None
    kafka_internals.request_rejoin(consumer)  # not started: nothing to ask, no error
    await consumer.stop()


def test_the_position_reader_reads_the_state_position_reads() -> None:
    """`position_now` reads what `AIOKafkaConsumer.position` reads (the subscription's
    assignment state): the public call's source must still name it."""
    source = inspect.getsource(AIOKafkaConsumer.position)
    assert "self._subscription.subscription.assignment" in source
    assert ".state_value(partition)" in source
    assert "tp_state.has_valid_position" in source and "tp_state.position" in source


def test_the_group_generation_and_the_static_leave_are_where_the_engine_looks() -> None:
    """`generation` reads the coordinator's `generation` (what the shards kept through a
    rebalance are judged by), and `become_dynamic` clears `_group_instance_id`, which
    is what stops aiokafka's leave from being skipped and its next join from naming
    the instance: both must still be there, used that way."""
    init = inspect.getsource(GroupCoordinator.__init__)
    assert "self._group_instance_id = group_instance_id" in init
    assert "self.generation = " in init
    leave = inspect.getsource(GroupCoordinator._maybe_leave_group)
    assert "self._group_instance_id is None" in leave
    join = inspect.getsource(GroupCoordinator.__init__.__globals__["CoordinatorGroupRebalance"])
    assert "self._coordinator._group_instance_id" in join

    class Coordinator:
        generation = 7
        _group_instance_id = "w-1"

    class Consumer:
        _coordinator = Coordinator()

    consumer: Any = Consumer()
    assert kafka_internals.generation(consumer) == 7
    Coordinator.generation = -1  # aiokafka's "no generation" after an expulsion
    assert kafka_internals.generation(consumer) is None
    assert kafka_internals.become_dynamic(consumer) is True
    assert consumer._coordinator._group_instance_id is None
    assert kafka_internals.generation(None) is None
    assert kafka_internals.become_dynamic(None) is False


async def test_the_group_fencing_internals_are_where_the_engine_looks() -> None:
    """The member read, the coordinator and client the offset read goes through, the
    offset commit's replaced handler and the transaction's failure
    (`streams.group_commit`) all touch aiokafka internals: each must be where it is
    looked for, or the worker's transactions would go without the generation check."""
    consumer = AIOKafkaConsumer(bootstrap_servers=NOWHERE, group_id="g", group_instance_id="i")
    assert kafka_internals.member(consumer) is None  # not joined
    made = inspect.getsource(GroupCoordinator.__init__)
    for attribute in ("self.generation =", "self.member_id =", "self._group_instance_id ="):
        assert attribute in made, attribute
    joined = SimpleNamespace(
        _coordinator=SimpleNamespace(generation=4, member_id="m-1", _group_instance_id="i")
    )
    assert kafka_internals.member(joined) == kafka_internals.GroupMember(4, "m-1", "i")  # type: ignore[arg-type]
    assert callable(GroupCoordinator.ensure_coordinator_known)
    assert callable(GroupCoordinator.coordinator_dead)
    assert kafka_internals.client(consumer) is consumer._client

    producer = AIOKafkaProducer(bootstrap_servers=NOWHERE, transactional_id="t")
    sender = producer._sender
    assert inspect.iscoroutinefunction(Sender._do_txn_offset_commit)
    assert list(inspect.signature(Sender._do_txn_offset_commit).parameters) == [
        "self", "offsets", "group_id",
    ]  # fmt: skip
    assert callable(sender._find_coordinator)
    kafka_internals.commit_offsets_with(producer, lambda *a: None)
    assert sender._do_txn_offset_commit is not Sender._do_txn_offset_commit

    # A transaction failed this way keeps what it added, so its abort reaches the broker.
    txn = sender._txn_manager
    txn.set_pid_and_epoch(1, 0)  # what InitProducerId's answer does
    txn.begin_transaction()
    txn._txn_partitions.add(TopicPartition("t", 0))
    txn._txn_consumer_group = "g"
    offsets_future = asyncio.get_running_loop().create_future()
    txn._pending_txn_offsets.append(("g", {}, offsets_future))
    kafka_internals.fail_transaction(sender, RuntimeError("refused"))
    assert txn.state.name == "ABORTABLE_ERROR"
    assert not txn.is_empty_transaction()
    assert isinstance(offsets_future.exception(), RuntimeError)
    await producer.stop()
    await consumer.stop()


async def test_a_rebalance_under_way_is_read_from_the_consumers_subscription() -> None:
    """`reassigning` follows aiokafka's own flag, the one `getmany` waits on; with no
    consumer to read it says True (the loop then does not poll under its lock)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=NOWHERE)
    consumer.subscribe(["t"])
    tp = TopicPartition("t", 0)
    consumer._subscription.assign_from_subscribed({tp})
    assert kafka_internals.reassigning(consumer) is False
    consumer._subscription.begin_reassignment()
    assert kafka_internals.reassigning(consumer) is True
    consumer._subscription.assign_from_subscribed({tp})
    assert kafka_internals.reassigning(consumer) is False
    assert kafka_internals.reassigning(SimpleNamespace()) is True  # type: ignore[arg-type]
    assert kafka_internals.reassigning(None) is True
    await consumer.stop()


def test_the_backoff_of_a_transaction_begun_during_markers_is_the_one_aiokafka_reads() -> None:
    from aiokafka.producer import sender
    from aiokafka.producer.sender import AddPartitionsToTxnHandler

    # aiokafka answers CONCURRENT_TRANSACTIONS on a transaction's first partitions with
    # the module's BACKOFF_OVERRIDE, read when the answer comes (a global, not a copy).
    assert "return BACKOFF_OVERRIDE" in inspect.getsource(AddPartitionsToTxnHandler)
    original = sender.BACKOFF_OVERRIDE
    try:
        kafka_internals.begin_transactions_sooner(0.003)
        assert sender.BACKOFF_OVERRIDE == 0.003
    finally:
        sender.BACKOFF_OVERRIDE = original


async def test_the_fetcher_internals_fetch_sessions_use_are_where_they_look() -> None:
    """`use_fetch_sessions` wraps the fetcher's `_get_actions_per_node` (whose first
    item is the (node id, FetchRequest) list) and its `_client` (through which the fetch
    is sent), and the fetcher matches an answer against `request.topics`."""
    from aiokafka.consumer.fetcher import Fetcher

    assert list(inspect.signature(Fetcher._get_actions_per_node).parameters) == [
        "self",
        "assignment",
    ]
    routine = inspect.getsource(Fetcher._fetch_requests_routine)
    assert "fetch_requests," in routine and "self._get_actions_per_node(assignment)" in routine
    proc = inspect.getsource(Fetcher._proc_fetch_request)
    assert "await self._client.send(node_id, request)" in proc
    assert "request.topics" in proc
    assert "self._client = client" in inspect.getsource(Fetcher.__init__)
    unstarted = AIOKafkaConsumer(bootstrap_servers=NOWHERE)  # no fetcher before start()
    assert kafka_internals.use_fetch_sessions(unstarted) is None
    await unstarted.stop()
