"""Every read of aiokafka's private internals the engine makes, in one place.

aiokafka has no public call for these things the engine needs: why a producer's sender
stopped, asking the group for a rebalance, a partition's position without waiting for an
offset reset, the group generation it joined, and leaving the group as a static member.
Each reads (or sets) an internal attribute and falls back quietly when it is missing, so
that a worker never breaks on it; `tests/unit/streams/test_kafka_internals.py` pins every
one of them against the installed aiokafka, so an upgrade that moves them fails there,
loudly, instead of degrading in production.
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition


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
