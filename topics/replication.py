"""What a start-up says about its topics' replication, decided from what the cluster
reported: the broker count and each existing topic's replica count. Pure functions, so
that every decision is tested without a cluster; `topics.admin.ensure_topics` asks the
brokers and acts on them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from core.settings import env_name
from topics.errors import TopicError
from topics.specs import TopicSpec

_REPLICATION = env_name("topic_replication")
_MIN_INSYNC = env_name("topic_min_insync_replicas")


class ReplicationError(TopicError):
    """The topics cannot be created with the configured replication on this cluster."""


def check_creatable(missing: Iterable[TopicSpec], brokers: int) -> None:
    """Refuse to create topics with more replicas than the cluster has brokers, in
    words that name the setting, rather than let each topic fail with Kafka's
    INVALID_REPLICATION_FACTOR. Only topics still to be created are checked: an
    existing topic of three replicas on a cluster with one broker down is what
    replication is for, and its start-up must go on."""
    specs = list(missing)
    if not specs:
        return
    factor = max(spec.replicas.factor for spec in specs)
    if factor > brokers:
        names = ", ".join(spec.name for spec in specs if spec.replicas.factor > brokers)
        raise ReplicationError(
            f"{_REPLICATION}={factor} but the Kafka cluster has {brokers} "
            f"broker{'s' if brokers != 1 else ''} up: cannot create {names} with more "
            f"replicas than brokers (lower {_REPLICATION} and {_MIN_INSYNC}, or start "
            "the missing brokers)"
        )


def single_copy_warning(specs: Iterable[TopicSpec], brokers: int) -> str | None:
    """The warning a start-up logs once when a cluster of several brokers holds the
    deployment's topics in one copy each: losing one broker's disk loses data, and
    the cluster's size suggests nobody meant that."""
    single = [spec.name for spec in specs if spec.replicas.factor == 1]
    if brokers <= 1 or not single:
        return None
    return (
        f"the Kafka cluster has {brokers} brokers but {_REPLICATION} is 1: every topic "
        "Tally creates has a single replica, so its durability depends on one broker "
        f"(set {_REPLICATION}=3 and {_MIN_INSYNC}=2 on three or more brokers)"
    )


def under_replicated(specs: Iterable[TopicSpec], actual: Mapping[str, int]) -> list[str]:
    """One warning per existing topic with fewer replicas than its spec asks for
    (`actual`: topic -> its smallest partition's replica count). Never fixed at start:
    adding replicas is a partition reassignment (kafka-reassign-partitions), an
    operator's decision about where the copies go and when to move the data."""
    return [
        f"topic {spec.name} has {actual[spec.name]} replica"
        f"{'s' if actual[spec.name] != 1 else ''} but {_REPLICATION} is "
        f"{spec.replicas.factor}; it was created before the setting changed and keeps "
        "its replicas (add them with a partition reassignment, "
        "kafka-reassign-partitions.sh)"
        for spec in specs
        if 0 < actual.get(spec.name, spec.replicas.factor) < spec.replicas.factor
    ]


def replica_counts(described: Iterable[Mapping[str, object]]) -> dict[str, int]:
    """Topic -> the replica count of its least-replicated partition, from
    `describe_topics` (topics without partitions are left out)."""
    counts: dict[str, int] = {}
    for topic in described:
        partitions = topic.get("partitions")
        if isinstance(partitions, list) and partitions:
            counts[str(topic["topic"])] = min(len(p.get("replicas", [])) for p in partitions)
    return counts
