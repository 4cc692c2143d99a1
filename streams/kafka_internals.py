"""Every read of aiokafka's private internals the engine makes, in one place.

aiokafka has no public call for these three things the engine needs: why a producer's
sender stopped, asking the group for a rebalance, and a partition's position without
waiting for an offset reset. Each reads an internal attribute and falls back quietly
when it is missing, so that a worker never breaks on it; `tests/unit/test_kafka_internals.py`
pins every one of them against the installed aiokafka, so an upgrade that moves them
fails there, loudly, instead of degrading in production.
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
