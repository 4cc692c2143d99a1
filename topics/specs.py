"""The topics Tally reads and writes: names, partition counts, cleanup and retention."""

from __future__ import annotations

from typing import Final, Literal

import msgspec

DAY_MS: Final = 24 * 3600 * 1000

# Every topic is stamped by the broker, not the producer: a record's timestamp is when
# the broker appended it. With the default CreateTime a producer chooses it, and a
# record stamped years ahead keeps its segment from ever being deleted (or one stamped
# years ago gets it deleted early). The engine decides nothing on record timestamps
# (its own clock is its time, see `streams.engine`), so this protects retention and
# whoever reads the timestamps downstream. `topics.admin.ensure_topics` moves existing
# topics to it.
TIMESTAMP_TYPE: Final = "LogAppendTime"


class Replicas(msgspec.Struct, frozen=True, kw_only=True):
    """How many brokers hold a copy of each partition (`factor`), and how many of those
    copies must have a write before the broker acknowledges it to an `acks=all`
    producer (`min_insync`, the topic's min.insync.replicas); every producer of Tally
    uses acks=all. 1/1 is right for one broker; three brokers want 3/2, so that one
    broker down loses nothing acknowledged and writes still go on. From
    TALLY_TOPIC_REPLICATION and TALLY_TOPIC_MIN_INSYNC_REPLICAS (`topics.names.replicas`)."""

    factor: int = 1
    min_insync: int = 1


# The default: what one broker can hold.
ONE_COPY: Final = Replicas()


class TopicSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    partitions: int
    cleanup_policy: Literal["delete", "compact"]
    # -1 keeps records forever. The events topic is the source every sink store is
    # rebuilt from, so it keeps everything unless an operator decides otherwise.
    retention_ms: int
    # Set at creation only: an existing topic's replication is an operator's
    # reassignment, never a start-up's (`topics.admin.ensure_topics` warns instead).
    replicas: Replicas = ONE_COPY

    def config(self) -> dict[str, str]:
        """Topic-level settings as the broker's admin API spells them."""
        config = {
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": str(self.retention_ms),
            "message.timestamp.type": TIMESTAMP_TYPE,
            # Always on the topic, never left to the broker's default: a cluster's
            # default (2 on three brokers) would refuse every write to a topic of one
            # replica, and one broker's default (1) would weaken a topic of three.
            "min.insync.replicas": str(self.replicas.min_insync),
        }
        if self.retention_ms == -1:
            # Kept forever means by size too, whatever the broker's default says.
            config["retention.bytes"] = "-1"
        return config


class Topics(msgspec.Struct, frozen=True, kw_only=True):
    """Every topic of one deployment. All are co-partitioned: partition p of each holds
    the accounts of shard p, which is what lets one agent own a shard end to end."""

    commands: TopicSpec
    internal: TopicSpec
    events: TopicSpec
    dead_letter: TopicSpec

    def all(self) -> tuple[TopicSpec, ...]:
        return (self.commands, self.internal, self.events, self.dead_letter)


def topics_for(prefix: str, partitions: int, replicas: Replicas = ONE_COPY) -> Topics:
    """The topic set of a deployment named `prefix` with `partitions` shards."""
    return Topics(
        # Client commands, keyed by the paying/owning account.
        commands=TopicSpec(
            name=f"{prefix}.commands",
            partitions=partitions,
            cleanup_policy="delete",
            retention_ms=7 * DAY_MS,
            replicas=replicas,
        ),
        # Credits, refunds and expiries the engine sends itself between partitions.
        # Kept apart from client commands so that no client can forge a credit.
        internal=TopicSpec(
            name=f"{prefix}.internal",
            partitions=partitions,
            cleanup_policy="delete",
            retention_ms=7 * DAY_MS,
            replicas=replicas,
        ),
        events=TopicSpec(
            name=f"{prefix}.events",
            partitions=partitions,
            cleanup_policy="delete",
            retention_ms=-1,
            replicas=replicas,
        ),
        dead_letter=TopicSpec(
            name=f"{prefix}.dead-letter",
            partitions=partitions,
            cleanup_policy="delete",
            retention_ms=30 * DAY_MS,
            replicas=replicas,
        ),
    )


def changelog_spec(name: str, partitions: int, replicas: Replicas = ONE_COPY) -> TopicSpec:
    """A table's changelog: compacted, so it keeps the last value of every key forever."""
    return TopicSpec(
        name=name,
        partitions=partitions,
        cleanup_policy="compact",
        retention_ms=-1,
        replicas=replicas,
    )
