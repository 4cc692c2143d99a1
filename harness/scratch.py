"""A scratch deployment: a unique prefix on the shared broker, database and Redis, with
its topics and schema made on the way in and everything it left dropped on the way out.

The benchmarks, the chaos harness and the demo each run in one, so that a run starts
from nothing, its checks cover exactly its own records and money, and two runs on one
machine never see each other's data. What `drop` removes is derived from the prefix
alone (`topics.names`): the deployment's topics and the engine's changelog, the
PostgreSQL schema, the Redis keys, and the state directory when one was given."""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from core.settings import Settings
from sinks import verify
from sinks.migrate import migrate
from topics.admin import delete_topics, ensure_topics
from topics.names import deployment_topics, engine_topic_specs, schema_name
from topics.specs import TopicSpec

log = logging.getLogger(__name__)

# Which topics to make on the way in: none (a process under test makes them), the
# deployment's four (commands, internal, events, dead letters), or those and the
# engine's changelog.
Topics = Literal["none", "deployment", "engine"]


class ScratchError(RuntimeError):
    """Part of a scratch deployment could not be dropped (the rest was)."""


def unique_prefix(kind: str, length: int = 6) -> str:
    """`kind-<random hex>`: a prefix no other run on the machine has."""
    return f"{kind}-{uuid.uuid4().hex[:length]}"


@dataclass
class Scratch:
    """A deployment of its own. `settings` are the given ones with the scratch prefix
    (and partition count when given): what the run passes on."""

    settings: Settings
    topics: Topics = "none"
    schema: bool = False  # migrate the PostgreSQL schema on the way in
    extra: Sequence[TopicSpec] = ()  # topics of the run's own, made and dropped too
    data_dir: Path | None = None  # a state directory of the run's, removed on the way out

    @property
    def prefix(self) -> str:
        return self.settings.topic_prefix

    def specs(self) -> list[TopicSpec]:
        """Every topic the deployment may have: dropped whichever were made."""
        return [*engine_topic_specs(self.settings), *self.extra]

    async def create(self) -> None:
        s = self.settings
        wanted: list[TopicSpec] = []
        if self.topics == "engine":
            wanted = engine_topic_specs(s)
        elif self.topics == "deployment":
            wanted = list(deployment_topics(s).all())
        if wanted or self.extra:
            await ensure_topics(s.kafka_bootstrap, [*wanted, *self.extra])
        if self.schema:
            await migrate(s.pg_dsn, schema_name(s), s.partitions, say=log.info)

    async def drop(self) -> None:
        """Remove everything the deployment may have left, each part whatever happened
        to the others; raise ScratchError naming what could not be removed."""
        s = self.settings
        failed: list[str] = []
        try:
            await delete_topics(s.kafka_bootstrap, [spec.name for spec in self.specs()])
        except Exception as exc:
            failed.append(f"topics: {exc!r}")
        try:
            await verify.drop(
                s.pg_dsn, schema_name(s), s.redis_url, s.topic_prefix, cluster=s.redis_cluster
            )
        except Exception as exc:
            failed.append(f"schema and Redis keys: {exc!r}")
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if failed:
            raise ScratchError(f"scratch deployment {self.prefix}: " + "; ".join(failed))


def deployment(
    settings: Settings,
    prefix: str,
    *,
    partitions: int | None = None,
    data_dir: Path | None = None,
    topics: Topics = "none",
    schema: bool = False,
    extra: Sequence[TopicSpec] = (),
) -> Scratch:
    """The scratch deployment `prefix` of `settings` (nothing is made yet). Refused for
    the prefix of `settings` itself: dropping the scratch would drop that deployment."""
    if not prefix or prefix == settings.topic_prefix:
        raise ValueError(f"a scratch deployment needs a prefix of its own, not {prefix!r}")
    changes: dict[str, object] = {"topic_prefix": prefix}
    if partitions is not None:
        changes["partitions"] = partitions
    local = msgspec.structs.replace(settings, **changes)
    return Scratch(local, topics=topics, schema=schema, extra=tuple(extra), data_dir=data_dir)


@asynccontextmanager
async def scratch(
    settings: Settings,
    prefix: str,
    *,
    partitions: int | None = None,
    data_dir: Path | None = None,
    topics: Topics = "none",
    schema: bool = False,
    extra: Sequence[TopicSpec] = (),
    keep: bool = False,
) -> AsyncIterator[Scratch]:
    """Make the scratch deployment, yield it, and drop it afterwards unless `keep`. A
    failure to drop does not hide the run's own exception (it is logged instead)."""
    found = deployment(
        settings, prefix, partitions=partitions, data_dir=data_dir, topics=topics,
        schema=schema, extra=extra,
    )  # fmt: skip
    try:
        await found.create()
        yield found
    except BaseException:
        if not keep:
            try:
                await found.drop()
            except ScratchError as exc:
                log.warning("%s", exc)
        raise
    if not keep:
        await found.drop()
