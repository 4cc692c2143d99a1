"""The single-broker faults find services.sh's broker, not a node of the three-broker
cluster that runs beside it (kafka-cluster.sh)."""

from __future__ import annotations

from harness.faults import _cluster_node

JAVA = ["java", "-Xmx512m", "-cp", "/c/kafka/lib/*", "kafka.Kafka"]


def test_a_cluster_node_is_told_apart_from_the_single_broker() -> None:
    for n in (1, 2, 3):
        assert _cluster_node([*JAVA, f"/c/kafka-cluster/broker-{n}/server.properties"])
    assert not _cluster_node([*JAVA, "/c/kafka/server.properties"])
    assert not _cluster_node(
        [*JAVA, "-Dlog4j.configuration=file:/r/scripts/kafka/log4j.properties"]
    )
