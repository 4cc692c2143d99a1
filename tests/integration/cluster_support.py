"""The three-broker Kafka cluster of `scripts/kafka-cluster.sh`, for the tests marked
`cluster`: they run when it is up and skip, saying how to start it, when it is not, so
that `make test` on one broker is unchanged. `make test-cluster` starts it and runs them."""

from __future__ import annotations

import socket

import msgspec
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from core.settings import Settings

CLUSTER_PORTS = (29092, 29093, 29094)
CLUSTER_BOOTSTRAP = ",".join(f"127.0.0.1:{port}" for port in CLUSTER_PORTS)
NOT_RUNNING = (
    "needs the 3-broker Kafka cluster on 127.0.0.1:29092-29094, which is not running "
    "(start it: scripts/kafka-cluster.sh up, or run make test-cluster)"
)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


async def registered_brokers(bootstrap: str = CLUSTER_BOOTSTRAP) -> int:
    """How many brokers the cluster's metadata lists (registered and not fenced)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        return len((await admin.describe_cluster())["brokers"])
    finally:
        await admin.close()


async def on_cluster(settings: Settings, **changes: object) -> Settings:
    """`settings` pointed at the cluster, with replication 3 and min ISR 2 (and
    `changes`); skips the test when the cluster is not up with all three brokers."""
    if not all(_listening(port) for port in CLUSTER_PORTS):
        pytest.skip(NOT_RUNNING)
    brokers = await registered_brokers()
    if brokers < len(CLUSTER_PORTS):
        pytest.skip(f"{NOT_RUNNING}: only {brokers} of 3 brokers are registered")
    wanted: dict[str, object] = {
        "kafka_bootstrap": CLUSTER_BOOTSTRAP,
        "topic_replication": 3,
        "topic_min_insync_replicas": 2,
        **changes,
    }
    return msgspec.structs.replace(settings, **wanted)
