"""What the sink tests share: a deployment of their own (topics, schema, Redis keys), an
engine process producing real events from a seeded workload, and in-process sinks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from core.settings import Settings
from harness.collector import Collector, all_answered, expected_counts
from harness.procs import EngineProcess, trickle
from harness.workload import Workload, build
from sinks import service, verify
from sinks.postgres import PostgresStore
from sinks.runner import SinkRunner
from topics.names import schema_name
from topics.specs import topics_for

PARTITIONS = 4


@dataclass
class Deployment:
    settings: Settings
    engine: EngineProcess
    collector: Collector
    workload: Workload

    @property
    def schema(self) -> str:
        return schema_name(self.settings)

    async def produce(self) -> None:
        """The workload, in slices over about two seconds: load still arriving while
        a fault test breaks something."""
        records = [(r.key, r.value, None) for r in self.workload.records]
        await trickle(self.settings.kafka_bootstrap, self.engine.topics.commands.name, records)

    async def drained(self) -> verify.Balances:
        """Wait for every command, credit and refund to be answered; the final balances
        as the events tell them."""
        expected = expected_counts(r.command_id for r in self.workload.records)
        done = all_answered(expected)
        assert await self.collector.wait_for(
            lambda r: done(r) and not r.pending_internal(), timeout_s=120, say=lambda _: None
        ), self.engine.tail()
        return verify.event_balances(self.collector.results)

    def runner(self, target: str, *, group: str | None = None) -> SinkRunner:
        runner = service.runner_for(self.settings, target)
        if target == "postgres":
            # Breakpoints every 5th seq, so that a small workload has plenty of them.
            runner.store = PostgresStore(self.settings.pg_dsn, self.schema, breakpoint_every=5)
        if group is not None:
            runner.group_id = group
        return runner

    async def pg(self) -> verify.Balances:
        return await verify.pg_balances(self.settings.pg_dsn, self.schema)

    async def project(self) -> tuple[SinkRunner, SinkRunner]:
        """Produce the workload with both sinks running, until the engine has answered
        everything and both stores are drained; the (stopped) PostgreSQL and Redis
        runners, with their counts."""
        pg, rd = self.runner("postgres"), self.runner("redis")
        async with running(pg, rd):
            await self.produce()
            await self.drained()
            assert await verify.wait_drained([pg, rd], timeout_s=60)
        return pg, rd


@contextlib.asynccontextmanager
async def deployment(
    settings: Settings, unique: str, tmp_path: Path, *, count: int = 1500, accounts: int = 120
) -> AsyncIterator[Deployment]:
    prefix = f"sink-{unique}"
    local = msgspec.structs.replace(settings, topic_prefix=prefix, partitions=PARTITIONS)
    engine = EngineProcess(
        settings, prefix=prefix, data_dir=tmp_path / "engine", partitions=PARTITIONS
    )
    workload = build(
        count=count, accounts=accounts, seed=5, now_ms=int(time.time() * 1000), expiring_holds=False
    )
    collector = Collector(settings.kafka_bootstrap, topics_for(prefix, PARTITIONS))
    await service.prepare(local, "postgres")
    try:
        await engine.start()
        await collector.start(from_end=False)
        yield Deployment(local, engine, collector, workload)
    finally:
        await collector.stop()
        await engine.stop()
        await verify.drop(
            local.pg_dsn, schema_name(local), local.redis_url, prefix, cluster=local.redis_cluster
        )


@contextlib.asynccontextmanager
async def running(*runners: SinkRunner) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(r.run()) for r in runners]
    try:
        yield
    finally:
        for r in runners:
            r.stop()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task  # a sink that crashed fails the test here
