"""One chaos run, start to end: the deployment, the workers and the sinks; the load and
the faults together; then heal, drain, read every topic back and check.

`Harness.execute` runs it and returns its record (`harness.chaos.record.Run`);
`Harness.clean` drops what it made in Kafka, PostgreSQL and Redis (the CLI's `--keep`
skips that)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from core.settings import Settings
from harness import cluster, faults
from harness.chaos.checks import (
    _check_conservation,
    _check_dead_letters,
    _check_results,
    _check_seq,
)
from harness.chaos.inject import Injector
from harness.chaos.load import produce_load
from harness.chaos.plan import DRAIN_TIMEOUT_S, KINDS, MAX_WORKERS, PARTITIONS, plan
from harness.chaos.record import ChaosError, Run, Timeline
from harness.chaos.waits import fault_waits
from harness.chaos.workers import Workers
from harness.checks import Check
from harness.collector import Collector, read_all
from harness.scratch import Scratch
from harness.waits import owners
from sinks import service, verify
from sinks.runner import SinkRunner
from topics.codec import decode_dead_letter, decode_result
from topics.names import schema_name
from topics.schema import Result
from topics.specs import topics_for

# After the drain, how long the result reader may take to have seen every answer.
WAITS_CATCH_UP_S = 15.0


def chaos_settings(settings: Settings, prefix: str, redis_db: int) -> Settings:
    """The run's deployment: its prefix, 4 shards, and a Redis database of its own (the
    run flushes it whole). A Redis Cluster has database 0 only: the run then uses (and
    flushes) that one."""
    url = urlsplit(settings.redis_url)
    db = 0 if cluster.redis_cluster_in_use(settings) else redis_db
    redis_url = urlunsplit((url.scheme, url.netloc, f"/{db}", url.query, url.fragment))
    return msgspec.structs.replace(
        settings, topic_prefix=prefix, partitions=PARTITIONS, redis_url=redis_url
    )


class Harness:
    def __init__(
        self,
        settings: Settings,
        *,
        seed: int,
        duration_s: float,
        faults_count: int,
        kinds: Iterable[str] = KINDS,
        workers: int = 2,
        rate: int = 300,
        accounts: int = 200,
        redis_db: int = 9,
        work_dir: Path,
        say: Callable[[str], None] = print,
    ) -> None:
        if not 2 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 2..{MAX_WORKERS}")
        self.accounts = accounts
        self.start_workers = workers
        prefix = f"chaos-{seed}-{int(time.time() * 1000) % 10**8}"
        self.settings = chaos_settings(settings, prefix, redis_db)
        self.run = Run(seed, duration_s, rate, plan(seed, duration_s, faults_count, kinds))
        self.run.prefix = prefix
        self.timeline = Timeline(self.run, say)
        self.workers = Workers(settings, prefix, work_dir / prefix, self.timeline)
        self.topics = topics_for(prefix, PARTITIONS)
        self.scratch = Scratch(self.settings, topics="engine", schema=True)
        self.sinks: list[SinkRunner] = []
        # The per-fault waits: when each answerable record was sent (by its place on
        # the commands topic), and a reader noting when each one's result was seen.
        self.sent: dict[bytes, tuple[int, float]] = {}
        self.collector = Collector(self.settings.kafka_bootstrap, self.topics, outlast_outages=True)
        self.injector = Injector(self.settings, self.run, self.workers, self.timeline)

    async def execute(self) -> Run:
        began = time.monotonic()
        await faults.flush_redis(self.settings.redis_url, cluster=self.settings.redis_cluster)
        await self.scratch.create()
        await self.collector.start(from_end=False)
        try:
            for _ in range(self.start_workers):
                await self.workers.add()
            await asyncio.gather(*(w.wait_ready() for w in self.workers.all))
            await self._with_sinks()
        finally:
            self.run.workers = [await self.workers.summary(w) for w in self.workers.all]
            await self.workers.stop()
            await self.collector.stop()
            self.run.seconds = time.monotonic() - began
        return self.run

    async def clean(self) -> None:
        """Drop what the run created in Kafka, PostgreSQL and Redis (logs stay)."""
        with contextlib.suppress(Exception):
            await self.scratch.drop()
        with contextlib.suppress(Exception):
            await faults.flush_redis(self.settings.redis_url, cluster=self.settings.redis_cluster)

    async def _with_sinks(self) -> None:
        """The sinks run from before the load until they drained after it; then check."""
        s = self.settings
        self.sinks = [service.runner_for(s, "postgres"), service.runner_for(s, "redis")]
        sink_tasks = [asyncio.create_task(r.run()) for r in self.sinks]
        try:
            await self._load_and_faults()
            await self.workers.heal()
            await self._drain()
            await self._measure_waits()
            for sink in self.sinks:
                sink.stop()
            await asyncio.gather(*sink_tasks)
            self.run.sinks = [
                f"{r.store.name}: {r.written_events} events written, {r.outages} outages,"
                f" {r.rebuilds} rebuilds after lost data"
                for r in self.sinks
            ]
            self.run.checks = await self._check()
        finally:
            for sink in self.sinks:
                sink.stop()
            for task in sink_tasks:
                task.cancel()
            await asyncio.gather(*sink_tasks, return_exceptions=True)

    async def _load_and_faults(self) -> None:
        """The load and the faults at once, with the workers supervised meanwhile."""
        self.timeline.start()
        load = asyncio.create_task(
            produce_load(
                self.settings, self.run, self.timeline, accounts=self.accounts, sent=self.sent
            )
        )
        chaos = asyncio.create_task(self.injector.run_plan())
        watch = asyncio.create_task(self.workers.supervise())
        try:
            await asyncio.gather(load, chaos)
        finally:
            for task in (load, chaos, watch):
                task.cancel()
            await asyncio.gather(load, chaos, watch, return_exceptions=True)

    async def _drain(self) -> None:
        """Until every partition of the commands and internal topics is served by a
        worker whose watchdog shows lag 0, twice in a row a second apart, then until
        both sinks have caught up with the events topic."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        quiet = 0
        last = ""
        while quiet < 2:
            if time.monotonic() > deadline:
                raise ChaosError(f"the engine did not drain in {DRAIN_TIMEOUT_S:.0f}s: {last}")
            lags: dict[tuple[str, int], int] = {}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                for worker in self.workers.all:
                    try:
                        async with session.get(f"http://127.0.0.1:{worker.port}/metrics") as r:
                            text = await r.text()
                    except (aiohttp.ClientError, TimeoutError):
                        continue
                    for family in text_string_to_metric_families(text):
                        if family.name != "tally_engine_partition_lag":
                            continue
                        for sample in family.samples:
                            key = (sample.labels["topic"], int(sample.labels["partition"]))
                            lags[key] = lags.get(key, 0) + int(sample.value)
            waiting = sum(lags.values())
            served = len(lags)
            last = f"{served} of {2 * PARTITIONS} partitions served, {waiting} records waiting"
            quiet = quiet + 1 if served == 2 * PARTITIONS and waiting == 0 else 0
            await asyncio.sleep(1.0)
        self.timeline.note(f"engine drained ({last})")
        if not await verify.wait_drained(self.sinks, timeout_s=DRAIN_TIMEOUT_S, quiet_s=2.0):
            raise ChaosError(f"the sinks did not drain in {DRAIN_TIMEOUT_S:.0f}s")
        self.timeline.note("sinks drained")

    async def _measure_waits(self) -> None:
        """Per fault, the longest waits on the shards kept and moved (harness.chaos.waits),
        once the engine drained: every answer that will come has come by then (the
        reader is given a moment to catch up with the last ones)."""
        sent = self.sent
        try:
            await self.collector.wait_for(
                lambda r: all(s in r.heard_at for s in sent),
                timeout_s=WAITS_CATCH_UP_S,
                say=lambda _: None,
            )
        except Exception as exc:  # the reader died: no waits, but the checks still run
            self.timeline.note(f"waits not measured: the result reader failed ({exc!r})")
            return
        heard = self.collector.results.heard_at
        final = await owners(self.workers.all)
        self.run.waits = fault_waits(
            self.injector.marks, final, self.sent, heard, until=time.monotonic()
        )
        if self.collector.outages:
            self.timeline.note(
                f"waits: the result reader outlasted {self.collector.outages} Kafka errors"
            )

    # Checks ------------------------------------------------------------------------------

    async def _check(self) -> list[Check]:
        s = self.settings
        t = self.topics
        try:
            commands, internal, events, letters = [
                (await read_all(s.kafka_bootstrap, spec.name, spec.partitions))[0]
                for spec in (t.commands, t.internal, t.events, t.dead_letter)
            ]
        except TimeoutError as exc:
            raise ChaosError(str(exc)) from exc
        results = [(r, decode_result(r.value or b"")) for r in events]
        return [
            Check(
                "no worker died except by kill -9",
                not self.workers.deaths,
                "; ".join(self.workers.deaths) or f"{len(self.workers.all)} workers",
            ),
            *_check_results(commands, internal, results),
            _check_seq(results),
            _check_conservation(results),
            _check_dead_letters(commands, [decode_dead_letter(r.value or b"") for r in letters]),
            await self._check_stores(results),
            await self._audit(),
        ]

    async def _check_stores(self, results: list[tuple[Any, Result]]) -> Check:
        final = verify.final_balances(result for _, result in results)
        s = self.settings
        stores = [
            verify.compare("PostgreSQL", final, await verify.pg_balances(s.pg_dsn, schema_name(s))),
            verify.compare(
                "Redis",
                final,
                await verify.redis_balances(s.redis_url, s.topic_prefix, cluster=s.redis_cluster),
            ),
        ]
        return Check(
            "stores hold the events' final balances",
            all(c.ok for c in stores),
            f"{len(final)} balances; "
            + ", ".join(f"{c.name} {len(c.mismatches)} wrong" for c in stores)
            + "".join(f"; e.g. {c.mismatches[0]}" for c in stores if c.mismatches),
        )

    async def _audit(self) -> Check:
        from audit.run import Audit, AuditError

        live = self.workers.live()
        try:
            report = await Audit(
                self.settings,
                engine_url=f"http://127.0.0.1:{live[0].port}",
                say=lambda _: None,
                progress_tty=False,
            ).run()
        except AuditError as exc:
            return Check("tally audit", False, f"could not run: {exc}")
        compared = ", ".join(f"{k} {v}" for k, v in sorted(report.compared.items()))
        bad = ", ".join(f"{k} {v}" for k, v in sorted(report.mismatches.items()) if v)
        return Check(
            "tally audit (ledger, PostgreSQL, Redis, engine)",
            report.ok,
            f"{report.balances} balances; compared {compared}"
            + (f"; MISMATCHES {bad}" if bad else ""),
        )
