"""Every name a deployment derives from its settings, in one place: its topics, the
engine's consumer group and changelog, the sinks' and the notifier's groups, and the
PostgreSQL schema and Redis key prefix its projections live under.

Two deployments on one broker, database and Redis differ only by `topic_prefix`; every
name below starts with it, so nothing of one can be read or written by the other."""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path

from core.settings import Settings
from topics.specs import Replicas, Topics, TopicSpec, changelog_spec, topics_for


def replicas(settings: Settings) -> Replicas:
    """The replication every topic of the deployment is created with."""
    return Replicas(
        factor=settings.topic_replication, min_insync=settings.topic_min_insync_replicas
    )


def deployment_topics(settings: Settings) -> Topics:
    """The command, internal, event and dead-letter topics of the deployment."""
    return topics_for(settings.topic_prefix, settings.partitions, replicas(settings))


def engine_group(settings: Settings) -> str:
    """The engine's consumer group, which is also its application id: the prefix of its
    changelog and of its transactional ids."""
    return f"{settings.topic_prefix}-engine"


def engine_instance(settings: Settings) -> str:
    """The worker's static member name in the engine's group (`group.instance.id`):
    TALLY_ENGINE_INSTANCE_ID when set, else this host's name and a digest of the
    worker's absolute data directory. The default is stable across restarts of one
    worker (same host, same directory: a StatefulSet pod keeps both) and differs between
    two workers of one host, which cannot share a data directory anyway."""
    if settings.engine_instance_id:
        return settings.engine_instance_id
    where = str(Path(settings.data_dir).resolve()).encode()
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:200] or "host"
    return f"{host}-{hashlib.sha256(where).hexdigest()[:12]}"


def changelog_name(app_id: str) -> str:
    """The compacted changelog behind the engine's tables."""
    return f"{app_id}-state-changelog"


def engine_topic_specs(settings: Settings, app_id: str | None = None) -> list[TopicSpec]:
    """Every topic the engine needs, its changelog included."""
    app = app_id or engine_group(settings)
    return [
        *deployment_topics(settings).all(),
        changelog_spec(changelog_name(app), settings.partitions, replicas(settings)),
    ]


def sink_group(settings: Settings, target: str) -> str:
    """The consumer group of the `target` ("postgres" or "redis") sink."""
    return f"{settings.topic_prefix}-sink-{target}"


def notify_group(settings: Settings) -> str:
    """The consumer group of the notifier."""
    return f"{settings.topic_prefix}-notify"


def schema_name(settings: Settings) -> str:
    """The PostgreSQL schema of the deployment's projections (quote it: see
    `sinks.migrate.quote`)."""
    return settings.topic_prefix


def redis_prefix(settings: Settings) -> str:
    """The prefix of every Redis key of the deployment."""
    return settings.topic_prefix
