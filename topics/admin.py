"""Create the deployment's topics from their specs, and refuse a partition-count mismatch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from contextlib import suppress

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from topics.specs import TopicSpec

# How long a freshly created topic may take to show its partitions in metadata.
metadata_wait_s = 15.0


class TopicMismatch(RuntimeError):
    """An existing topic has a different partition count than the deployment's shards."""


async def ensure_topics(
    bootstrap: str, specs: Iterable[TopicSpec], *, replication: int = 1
) -> list[str]:
    """Create the missing topics; return the names created. Existing topics must have the
    configured partition count: shards are fixed, so a mismatch is a migration, not an edit."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        wanted = list(specs)
        existing = set(await admin.list_topics())
        missing = [spec for spec in wanted if spec.name not in existing]
        if missing:
            # Another process may create them between our list and create: that is fine.
            with suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [
                        NewTopic(
                            spec.name,
                            num_partitions=spec.partitions,
                            replication_factor=replication,
                            topic_configs=spec.config(),
                        )
                        for spec in missing
                    ]
                )
        counts = await _partition_counts(admin, [spec.name for spec in wanted])
        for spec in wanted:
            if counts.get(spec.name, spec.partitions) != spec.partitions:
                raise TopicMismatch(
                    f"topic {spec.name} has {counts[spec.name]} partitions but "
                    f"TALLY_PARTITIONS is {spec.partitions}; changing the shard count "
                    "needs a replay into new topics"
                )
        return [spec.name for spec in missing]
    finally:
        await admin.close()


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    """Partition counts by topic, waiting out the moment after a create when the broker
    still describes a new topic with no partitions."""
    deadline = time.monotonic() + metadata_wait_s
    while True:
        described = await admin.describe_topics(names)
        counts = {d["topic"]: len(d["partitions"]) for d in described}
        if all(counts.get(n, 0) > 0 for n in names) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.2)


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    """Delete the named topics that exist (benchmarks and demos clean up after
    themselves: thousands of leftover partitions make a dev broker slow to restart)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        doomed = [n for n in names if n in existing]
        for start in range(0, len(doomed), 100):
            await admin.delete_topics(doomed[start : start + 100])
    finally:
        await admin.close()
