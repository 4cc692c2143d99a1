"""How a failed batch is classified: a fenced producer (another worker took the shard's
transactional id) must be told apart from an outage, or the worker would take the shard
back from its rightful owner."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka.errors import KafkaError, ProducerFenced

from streams.engine import _fenced


def _producer(sender_error: BaseException | None) -> SimpleNamespace:
    class Task:
        def done(self) -> bool:
            return sender_error is not None

        def cancelled(self) -> bool:
            return False

        def exception(self) -> BaseException | None:
            return sender_error

    return SimpleNamespace(_sender=SimpleNamespace(sender_task=Task()))


def test_producer_fenced_itself_or_as_a_cause_is_fencing() -> None:
    assert _fenced(ProducerFenced(), None)
    wrapped = KafkaError("Unexpected error during batch delivery")
    wrapped.__cause__ = ProducerFenced()
    assert _fenced(wrapped, None)


def test_a_sender_stopped_by_fencing_makes_a_plain_error_fencing() -> None:
    assert _fenced(KafkaError("batch failed"), _producer(ProducerFenced()))  # type: ignore[arg-type]


def test_an_outage_is_not_fencing() -> None:
    outage = KafkaError("Unexpected error during batch delivery")
    outage.__cause__ = ConnectionError("closed")
    assert not _fenced(outage, _producer(outage))  # type: ignore[arg-type]
    assert not _fenced(outage, _producer(None))  # type: ignore[arg-type]
    assert not _fenced(outage, None)


async def test_the_aiokafka_internals_the_engine_reads_are_where_it_looks() -> None:
    """The watchdog's position, the fencing check and the rejoin request read aiokafka
    internals (no public call exists); they fall back quietly when those are missing,
    so an aiokafka upgrade that moves them must fail here instead."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.consumer.group_coordinator import GroupCoordinator
    from aiokafka.producer.sender import Sender

    from streams.engine import _position_now

    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")
    tp = TopicPartition("t", 0)
    consumer.assign([tp])
    assert _position_now(consumer, tp) is None  # assigned, no position yet
    consumer._subscription.subscription.assignment.state_value(tp).seek(42)
    assert _position_now(consumer, tp) == 42
    assert callable(GroupCoordinator.request_rejoin)
    assert isinstance(Sender.sender_task, property)
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
    assert isinstance(producer._sender, Sender)
    await producer.stop()
    await consumer.stop()
