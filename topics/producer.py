"""The one way Tally builds a Kafka producer for records it must not lose: every
replica acknowledges (`acks=all`) and retries cannot duplicate or reorder a partition's
records (idempotence). Callers add their own batching (`linger_ms`, `max_batch_size`),
timeouts or a transactional id."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer


def durable_producer(bootstrap: str, **options: Any) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, **options
    )
