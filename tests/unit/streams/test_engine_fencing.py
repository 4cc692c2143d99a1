"""How a failed batch is classified: a fenced producer (another worker took the shard's
transactional id) must be told apart from an outage, or the worker would take the shard
back from its rightful owner."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka.errors import KafkaError, ProducerFenced

from streams.ownership import fenced as _fenced


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
