"""What the integration tests that run a deployment share: a scratch deployment of a
module's own (a unique prefix, its settings, a temporary directory) that names its
engine and ingress processes, the PostgreSQL and Redis sinks run in this process, and
starting processes so that a start failing part way stops every one already started."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec
import pytest

from core.settings import Settings
from harness.procs import EngineProcess, IngressProcess
from sinks import service


class Process(Protocol):
    """What `started` needs of a process (harness.procs' children have it)."""

    async def start(self) -> None: ...

    async def stop(self) -> int: ...


@dataclass(frozen=True)
class Scratch:
    """A deployment of one test module: `prefix` names its topics, schema and Redis
    keys; `unique` makes account names of its own."""

    base: Settings
    prefix: str
    unique: str
    tmp: Path
    partitions: int

    @property
    def settings(self) -> Settings:
        """The base settings with this deployment's prefix and partitions."""
        return msgspec.structs.replace(
            self.base, topic_prefix=self.prefix, partitions=self.partitions
        )

    def engine(self, name: str = "engine") -> EngineProcess:
        """An engine worker with its state under tmp/`name`."""
        return EngineProcess(
            self.base, prefix=self.prefix, data_dir=self.tmp / name, partitions=self.partitions
        )

    def ingress(
        self, name: str, *, prefix: str | None = None, keys: dict[str, str] | None = None,
        **overrides: Any,
    ) -> IngressProcess:  # fmt: skip
        """An ingress logging to tmp/`name`.log, on this deployment (or on `prefix`)."""
        return IngressProcess(
            self.base, prefix=prefix or self.prefix, log_path=self.tmp / f"{name}.log",
            partitions=self.partitions, keys=keys, **overrides,
        )  # fmt: skip


def scratch(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, name: str, partitions: int
) -> Scratch:
    unique = str(time.time_ns())[-9:]
    tmp = tmp_path_factory.mktemp(name)
    return Scratch(settings, f"{name}-{unique}", unique, tmp, partitions)


@contextlib.asynccontextmanager
async def started(*stages: Sequence[Process]) -> AsyncIterator[None]:
    """Start the processes of each stage together, stage after stage; on the way out
    (the end of the tests, or a start that failed) stop every process of every stage,
    the last stage first. A stage's starts all finish before a failure is raised, so
    that none is still starting while the others are stopped."""
    try:
        for stage in stages:
            outcomes = await asyncio.gather(*(p.start() for p in stage), return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        yield
    finally:
        for stage in reversed(stages):
            for proc in stage:
                await proc.stop()


@contextlib.asynccontextmanager
async def sinks_in_process(settings: Settings) -> AsyncIterator[None]:
    """The deployment's PostgreSQL and Redis sinks, running in this process until the
    block ends (the schema is made first: the ingress reads it)."""
    await service.prepare(settings, "postgres")
    runners = [service.runner_for(settings, "postgres"), service.runner_for(settings, "redis")]
    tasks = [asyncio.create_task(r.run()) for r in runners]
    try:
        yield
    finally:
        for runner in runners:
            runner.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
