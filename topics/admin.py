"""Create the deployment's topics from their specs, move existing ones to the settings
every start-up must enforce, and refuse a partition-count mismatch. Replication is checked
against the cluster (`topics.replication`): refused when it cannot be met, warned about
when it is 1 on several brokers or an existing topic has fewer replicas than asked."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError, for_code

from topics.errors import TopicError
from topics.replication import (
    check_creatable,
    replica_counts,
    single_copy_warning,
    under_replicated,
)
from topics.specs import TopicSpec

log = logging.getLogger(__name__)

# How long a freshly created topic may take to show its partitions in metadata.
metadata_wait_s = 15.0


# Topic settings that every start-up enforces on existing topics too (the others, such as
# retention, are only set at creation: an operator may have changed them on purpose).
enforced_configs = ("message.timestamp.type",)
# A describe-configs entry's source: set on the topic itself (not a broker default).
_DYNAMIC_TOPIC_CONFIG = 1


class TopicMismatch(TopicError):
    """An existing topic has a different partition count than the deployment's shards."""


class TopicConfigError(TopicError):
    """The broker refused to change an existing topic's enforced settings."""


class TopicCreateError(TopicError):
    """The broker refused to create a topic (the message is the broker's reason)."""


async def ensure_topics(bootstrap: str, specs: Iterable[TopicSpec]) -> list[str]:
    """Create the missing topics, with the replication of their specs; return the names
    created. Existing topics must have the configured partition count: shards are fixed,
    so a mismatch is a migration, not an edit."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        wanted = list(specs)
        brokers = len((await admin.describe_cluster())["brokers"])
        if warning := single_copy_warning(wanted, brokers):
            log.warning("%s", warning)
        existing = set(await admin.list_topics())
        missing = [spec for spec in wanted if spec.name not in existing]
        if missing:
            check_creatable(missing, brokers)
            response = await admin.create_topics(
                [
                    NewTopic(
                        spec.name,
                        num_partitions=spec.partitions,
                        replication_factor=spec.replicas.factor,
                        topic_configs=spec.config(),
                    )
                    for spec in missing
                ]
            )
            created = _created(response.topic_errors)
        else:
            created = []
        described = await _describe_led(admin, [spec.name for spec in wanted])
        counts = {d["topic"]: len(d["partitions"]) for d in described}
        for line in under_replicated(
            [spec for spec in wanted if spec.name not in created], replica_counts(described)
        ):
            log.warning("%s", line)
        # All of them: a topic listed as missing may have been created meanwhile by an
        # older version of Tally, with other settings.
        await _enforce_configs(admin, wanted)
        for spec in wanted:
            if counts.get(spec.name, spec.partitions) != spec.partitions:
                raise TopicMismatch(
                    f"topic {spec.name} has {counts[spec.name]} partitions but "
                    f"TALLY_PARTITIONS is {spec.partitions}; changing the shard count "
                    "needs a replay into new topics"
                )
        return created
    finally:
        await admin.close()


def _created(topic_errors: Iterable[tuple[Any, ...]]) -> list[str]:
    """The topics the create request made; TopicCreateError for the first one the broker
    refused. The admin client returns the refusals instead of raising them. One that
    exists already is fine: another process created it between our list and create, or
    the broker that answered the list had not caught up with the metadata yet."""
    created = []
    for name, error_code, *rest in topic_errors:
        if not error_code:
            created.append(name)
        elif for_code(error_code) is not TopicAlreadyExistsError:
            reason = rest[0] if rest and rest[0] else ""
            raise TopicCreateError(
                f"the broker refused to create topic {name}: "
                f"{for_code(error_code).__name__} {reason}".rstrip()
            )
    return created


async def topic_configs(
    admin: AIOKafkaAdminClient, names: list[str], *, settle_s: float = 0.0
) -> dict[str, dict[str, str]]:
    """Topic name -> the settings set on the topic itself (its overrides). With
    `settle_s`, a topic the answering broker does not know yet is asked again for up to
    that long: on a cluster, the broker that answers may not have caught up with the
    metadata of a topic another broker just described (each follows the controller's
    log at its own pace)."""
    if not names:
        return {}
    deadline = time.monotonic() + settle_s
    while True:
        try:
            return await _topic_configs_once(admin, names)
        except UnknownTopicOrPartitionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _topic_configs_once(
    admin: AIOKafkaAdminClient, names: list[str]
) -> dict[str, dict[str, str]]:
    described = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    )
    found: dict[str, dict[str, str]] = {}
    for response in described:
        for error_code, _message, _type, name, entries in response.resources:
            if error_code:
                raise for_code(error_code)(f"describe configs of {name}")
            found[name] = {
                key: value
                for key, value, _read_only, source, *_ in entries
                if source == _DYNAMIC_TOPIC_CONFIG
            }
    return found


async def _enforce_configs(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> None:
    """Alter existing topics whose enforced settings differ from their spec. The admin
    API's AlterConfigs replaces a topic's whole set of overrides, so the ones it has
    are sent back with the change: an operator's retention survives the migration."""
    changes = _config_changes(
        specs, await topic_configs(admin, [spec.name for spec in specs], settle_s=metadata_wait_s)
    )
    if not changes:
        return
    for response in await admin.alter_configs(changes):
        for error_code, message, _type, name in response.resources:
            if error_code:
                raise TopicConfigError(
                    f"cannot set {', '.join(enforced_configs)} on topic {name}: "
                    f"{for_code(error_code).__name__} {message or ''}".rstrip()
                )
    # The brokers apply a change a moment after the controller took it: wait for it, so
    # that a start-up is done with the migration when it returns.
    deadline = time.monotonic() + metadata_wait_s
    while _config_changes(
        specs, await topic_configs(admin, [spec.name for spec in specs], settle_s=metadata_wait_s)
    ):
        if time.monotonic() > deadline:
            raise TopicConfigError(
                f"the brokers did not apply {', '.join(enforced_configs)} to "
                f"{', '.join(c.name for c in changes)} within {metadata_wait_s:.0f}s"
            )
        await asyncio.sleep(0.2)


def _config_changes(
    specs: list[TopicSpec], current: dict[str, dict[str, str]]
) -> list[ConfigResource]:
    """The alterations that bring each topic's enforced settings to its spec's."""
    changes = []
    for spec in specs:
        have = current.get(spec.name, {})
        want = {k: v for k, v in spec.config().items() if k in enforced_configs}
        if any(have.get(k) != v for k, v in want.items()):
            changes.append(ConfigResource(ConfigResourceType.TOPIC, spec.name, {**have, **want}))
    return changes


async def _describe_led(admin: AIOKafkaAdminClient, names: list[str]) -> list[dict[str, Any]]:
    """The topics as described once they show their partitions, each with a leader:
    waits out the moment after a create when the broker still describes a new topic
    with no partitions, or partitions without a leader (after the wait, as they are)."""
    deadline = time.monotonic() + metadata_wait_s
    while True:
        described: list[dict[str, Any]] = await admin.describe_topics(names)
        counts = {d["topic"]: len(d["partitions"]) for d in described}
        if all(counts.get(n, 0) > 0 for n in names) and _all_led(described):
            return described
        if time.monotonic() > deadline:
            return described
        await asyncio.sleep(0.2)


def _all_led(described: list[dict[str, Any]]) -> bool:
    """Whether every partition of the described topics has a leader. Until then a
    client that fetches offsets or produces meets NotLeaderForPartition and retries
    (aiokafka logs that at ERROR, which reads as a failure at every first start)."""
    return all(
        p.get("error_code", 0) == 0 and p.get("leader", -1) >= 0
        for d in described
        for p in d["partitions"]
    )


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    """Delete the named topics; those that do not exist are skipped (benchmarks and demos
    clean up after themselves: thousands of leftover partitions make a dev broker slow to
    restart). The names are not checked against a listing first: on a cluster, the
    broker that answers a listing may not know yet of a topic created a moment ago, and
    the delete would miss it for good, while the delete itself goes to the controller,
    which knows every topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for start in range(0, len(names), 100):
            response = await admin.delete_topics(names[start : start + 100])
            for name, error_code in response.topic_error_codes:
                if error_code and for_code(error_code) is not UnknownTopicOrPartitionError:
                    log.warning(
                        "could not delete topic %s: %s", name, for_code(error_code).__name__
                    )
    finally:
        await admin.close()
