"""The chaos harness: several engine workers in one consumer group under a seeded load,
broken on a seeded schedule, then checked for nothing lost and nothing doubled.

One run:
1. A deployment of its own (topic prefix `chaos-<seed>-<id>`, a PostgreSQL schema of that
   name, Redis database `redis_db` which the run may flush whole), 2-3 `tally engine`
   processes in one group (each its own state directory and web port), and the
   PostgreSQL and Redis sinks.
2. A bounded load: `harness.workload` records from the seed (transfers that mostly cross
   shards, disbursements, holds with captures, releases and expiries, settings, exact
   repeats, reused ids and undecodable garbage), produced with acks=all at a fixed rate
   for a fixed time. A send that fails is sent again, as any client would: a repeat
   that Kafka had in fact taken is then answered `duplicate`.
3. Faults on a schedule drawn from the seed while the load runs: `kill -9` of a worker
   (restarted after a moment, sometimes without its state directory), SIGSTOP of a
   worker past its session timeout then SIGCONT (a zombie: its shards have moved on and
   it must not publish anything for them), a worker added, the Kafka broker restarted,
   PostgreSQL restarted, Redis flushed.
4. Heal (every worker running), wait until the workers' watchdogs show no lag and the
   sinks have drained, read every topic back from offset 0 and check (`Check`): one
   result per command record, one decision per (account, command id), one result per
   internal command, every balance's seq 1..n once, conservation per asset, dead letters exactly
   the garbage, the final balances of the events in PostgreSQL, and `tally audit`
   (the ledger recomputes every balance; PostgreSQL, Redis and the engine agree).

A failed run prints its seed and schedule: `tally chaos --seed S --duration D` runs the
same load and faults again (timings on a busy machine differ, the plan does not).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import shutil
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec
from aiokafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families

from core.settings import Settings
from harness import faults
from harness.collector import implied_ids, read_all
from harness.errors import HarnessError
from harness.procs import EngineProcess
from harness.workload import build
from sinks import service, verify
from sinks.runner import SinkRunner
from streams.engine import session_timeout_ms
from topics.admin import delete_topics, ensure_topics
from topics.codec import Undecodable, decode_command, decode_dead_letter, decode_result
from topics.names import engine_group, engine_topic_specs, schema_name
from topics.producer import durable_producer
from topics.schema import Capture, DeadLetter, Result, Status, source, source_in
from topics.specs import topics_for

log = logging.getLogger(__name__)

KINDS = ("kill9", "sigstop", "add_worker", "broker_restart", "pg_restart", "redis_flush")
# The short form run by `make test`: the faults that move shards between workers
# (a crash, a zombie) and the one that takes everything away at once (the broker).
SHORT_KINDS = ("kill9", "sigstop", "broker_restart")
PARTITIONS = 4
MAX_WORKERS = 3
# How long a SIGSTOPped worker stays stopped: past its session timeout, so that the
# group gives its shards to another worker before it wakes up.
STOP_S = session_timeout_ms / 1000 + 6
# ...and at most this much longer while its shards are still being taken over elsewhere.
STOP_MORE_S = 30.0
DRAIN_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Fault:
    at_s: float  # seconds after the load starts
    kind: str
    pick: float  # which worker, as a fraction of the live ones (the plan cannot know them)
    pause_s: float  # how long the thing stays down (kill9, broker, postgres)
    lose_disk: bool = False  # kill9: restart without the worker's state directory

    def line(self) -> str:
        extra = {
            "kill9": f"restart after {self.pause_s:.1f}s"
            + (", state directory deleted" if self.lose_disk else ""),
            "sigstop": f"SIGCONT after {STOP_S:.0f}s",
            "broker_restart": f"down {self.pause_s:.1f}s",
            "pg_restart": f"down {self.pause_s:.1f}s",
        }.get(self.kind, "")
        return f"t+{self.at_s:5.1f}s  {self.kind:<15} {extra}"


def plan(seed: int, duration_s: float, count: int, kinds: Iterable[str] = KINDS) -> list[Fault]:
    """`count` faults between 10% and 80% of the load: every kind once (in a seeded order)
    before any repeats, at seeded times at least a few seconds apart."""
    rng = random.Random(f"chaos-{seed}")
    kinds = list(kinds)
    order = rng.sample(kinds, len(kinds))
    chosen = [order[i] if i < len(order) else rng.choice(kinds) for i in range(count)]
    start, end = 0.1 * duration_s, 0.8 * duration_s
    slot = (end - start) / max(count, 1)
    faults_ = []
    for i, kind in enumerate(chosen):
        at = start + i * slot + rng.uniform(0, slot * 0.3)
        faults_.append(
            Fault(
                at_s=round(at, 1),
                kind=kind,
                pick=rng.random(),
                pause_s=round(rng.uniform(1.0, 4.0), 1),
                lose_disk=kind == "kill9" and rng.random() < 0.35,
            )
        )
    return faults_


@dataclass
class Zombie:
    """A worker SIGSTOPped past its session timeout: the shards it served when it was
    stopped, and those of them other workers served before it was continued. A shard is
    served only after its new owner initialised the shard's transactional id, which
    fences the old owner's producer: a zombie whose shards were all taken over cannot
    commit anything for them."""

    worker: int
    served: list[int]
    taken_over: list[int]
    stopped_s: float


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Run:
    seed: int
    duration_s: float
    rate: int
    plan: list[Fault]
    prefix: str = ""
    produced: int = 0
    resent: int = 0
    injected: list[str] = field(default_factory=list)  # what happened, with times
    carried_out: list[str] = field(default_factory=list)  # the kind of each fault injected
    skipped: list[str] = field(default_factory=list)  # faults of the plan not injected, why
    zombies: list[Zombie] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    sinks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


class ChaosError(HarnessError):
    """The run could not be carried out (not a finding: a broken setup)."""


def chaos_settings(settings: Settings, prefix: str, redis_db: int) -> Settings:
    """The run's deployment: its prefix, 4 shards, and a Redis database of its own (the
    run flushes it whole)."""
    url = urlsplit(settings.redis_url)
    redis_url = urlunsplit((url.scheme, url.netloc, f"/{redis_db}", url.query, url.fragment))
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
        self.seed = seed
        self.say = say
        self.rate = rate
        self.accounts = accounts
        self.start_workers = workers
        prefix = f"chaos-{seed}-{int(time.time() * 1000) % 10**8}"
        self.settings = chaos_settings(settings, prefix, redis_db)
        self.base = settings
        self.work_dir = work_dir / prefix
        self.run = Run(seed, duration_s, rate, plan(seed, duration_s, faults_count, kinds))
        self.run.prefix = prefix
        self.workers: list[EngineProcess] = []
        self.topics = topics_for(prefix, PARTITIONS)
        self.sinks: list[SinkRunner] = []
        self._started = 0.0
        self._killed: set[int] = set()  # workers this harness killed and not restarted yet
        self._retired: set[int] = set()  # workers stopped for good (a scale-down)
        self.deaths: list[str] = []  # workers that exited on their own

    # The run -----------------------------------------------------------------------------

    async def execute(self) -> Run:
        began = time.monotonic()
        s = self.settings
        await faults.flush_redis(s.redis_url)
        await ensure_topics(s.kafka_bootstrap, engine_topic_specs(s, engine_group(s)))
        await service.prepare(s, "postgres")
        try:
            for _ in range(self.start_workers):
                await self._add_worker()
            await asyncio.gather(*(w.wait_ready() for w in self.workers))
            self.sinks = [service.runner_for(s, "postgres"), service.runner_for(s, "redis")]
            sink_tasks = [asyncio.create_task(r.run()) for r in self.sinks]
            try:
                self._started = time.monotonic()
                load = asyncio.create_task(self._load())
                chaos = asyncio.create_task(self._faults())
                watch = asyncio.create_task(self._supervise())
                try:
                    await asyncio.gather(load, chaos)
                finally:
                    for task in (load, chaos, watch):
                        task.cancel()
                    await asyncio.gather(load, chaos, watch, return_exceptions=True)
                await self._heal()
                await self._drain()
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
        finally:
            self.run.workers = [await self._worker_summary(w) for w in self.workers]
            for w in self.workers:
                if w.proc is not None and w.proc.returncode is None:
                    w.proc.send_signal(signal.SIGCONT)
                await w.stop()
            self.run.seconds = time.monotonic() - began
        return self.run

    async def clean(self) -> None:
        """Drop what the run created in Kafka, PostgreSQL and Redis (logs stay)."""
        s = self.settings
        names = [spec.name for spec in engine_topic_specs(s, engine_group(s))]
        with contextlib.suppress(Exception):
            await delete_topics(s.kafka_bootstrap, names)
        with contextlib.suppress(Exception):
            await verify.drop(s.pg_dsn, schema_name(s), s.redis_url, s.topic_prefix)
        with contextlib.suppress(Exception):
            await faults.flush_redis(s.redis_url)

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    def _note(self, text: str) -> None:
        line = f"t+{self._elapsed():5.1f}s  {text}"
        self.run.injected.append(line)
        self.say(f"chaos: {line}")

    # Workers -----------------------------------------------------------------------------

    async def _add_worker(self) -> EngineProcess:
        n = len(self.workers)
        worker = EngineProcess(
            self.base,
            prefix=self.settings.topic_prefix,
            data_dir=self.work_dir / f"worker-{n}",
            partitions=PARTITIONS,
        )
        self.workers.append(worker)
        await worker.start(wait=False)
        return worker

    async def _supervise(self) -> None:
        """What a process supervisor does in production: a worker that exited without
        being killed by the harness is noted (a finding) and started again."""
        while True:
            await asyncio.sleep(0.5)
            for n, worker in enumerate(self.workers):
                proc = worker.proc
                if proc is None or proc.returncode is None or n in self._killed | self._retired:
                    continue
                self.deaths.append(
                    f"worker-{n} exited {proc.returncode} at t+{self._elapsed():.1f}s"
                )
                self._note(f"worker-{n} EXITED on its own ({proc.returncode}); restarting it")
                await worker.start(wait=False)

    def _live(self) -> list[EngineProcess]:
        return [w for w in self.workers if w.proc is not None and w.proc.returncode is None]

    async def _worker_summary(self, w: EngineProcess) -> dict[str, Any]:
        summary: dict[str, Any] = {"log": str(w.log_path)}
        with contextlib.suppress(Exception):
            summary.update(await asyncio.wait_for(w.readyz(), 5))
        return summary

    # Load --------------------------------------------------------------------------------

    async def _load(self) -> None:
        total = int(self.rate * self.run.duration_s)
        work = build(
            count=total, accounts=self.accounts, seed=self.seed, now_ms=int(time.time() * 1000)
        )
        topic = self.topics.commands.name
        producer = durable_producer(self.settings.kafka_bootstrap, linger_ms=5)
        await producer.start()
        tick = 0.1
        per_tick = max(1, int(self.rate * tick))
        pending: list[tuple[Any, Any]] = []
        retry: list[Any] = []
        records = collections.deque(work.records)
        next_at = time.monotonic()
        # Bounded: the records are sent within the duration (plus a grace for outages);
        # what is still unacknowledged after it is reported, not waited for for ever.
        deadline = self._started + self.run.duration_s + 120
        try:
            while (records or retry or pending) and time.monotonic() < deadline:
                batch, retry = retry, []
                while records and len(batch) < per_tick:
                    batch.append(records.popleft())
                for record in batch:
                    try:
                        future = await producer.send(topic, record.value, key=record.key.encode())
                    except KafkaError:
                        retry.append(record)
                        continue
                    pending.append((record, future))
                still = []
                for record, future in pending:
                    if not future.done():
                        still.append((record, future))
                    elif future.exception() is not None:
                        retry.append(record)
                        self.run.resent += 1
                    else:
                        self.run.produced += 1
                pending = still
                next_at += tick
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 30)
        if records or retry or pending:
            raise ChaosError(
                f"the load could not be produced: {len(records) + len(retry) + len(pending)}"
                " records not acknowledged by Kafka"
            )
        self._note(f"load done: {self.run.produced} records acknowledged, {self.run.resent} resent")

    # Faults ------------------------------------------------------------------------------

    async def _faults(self) -> None:
        for fault in self.run.plan:
            wait = self._started + fault.at_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._inject(fault)

    def _pick(self, fault: Fault) -> tuple[int, EngineProcess] | None:
        live = self._live()
        if not live:
            return None
        worker = live[min(len(live) - 1, int(fault.pick * len(live)))]
        return self.workers.index(worker), worker

    async def _inject(self, fault: Fault) -> None:
        kind = fault.kind
        if kind == "add_worker":
            if len(self._live()) >= MAX_WORKERS:
                # At the most workers: scale down instead, so that the group changes
                # either way. A clean leave: SIGTERM, the worker flushes and leaves.
                n = max(i for i, w in enumerate(self.workers) if w in self._live())
                self._retired.add(n)
                code = await self.workers[n].stop()
                self._note(f"add_worker: {MAX_WORKERS} workers already; worker-{n} left"
                           f" instead (SIGTERM, exit {code})")  # fmt: skip
                self.run.carried_out.append(kind)
                return
            await self._add_worker()
            self._note(f"add_worker: worker-{len(self.workers) - 1} started")
            self.run.carried_out.append(kind)
            return
        if kind in ("kill9", "sigstop"):
            picked = self._pick(fault) if kind == "kill9" else await self._pick_serving(fault)
            if picked is None:
                self._note(f"{kind} skipped: no live worker")
                self.run.skipped.append(f"t+{fault.at_s:.1f}s {kind}: no live worker")
                return
            n, worker = picked
            if kind == "kill9":
                self._killed.add(n)
                code = await worker.kill()
                self._note(f"kill9: worker-{n} killed (SIGKILL, exit {code})")
                if code == -signal.SIGKILL:
                    self.run.carried_out.append(kind)
                else:  # it had exited already: not this fault
                    self.run.skipped.append(f"t+{fault.at_s:.1f}s kill9: worker-{n} exit {code}")
                await asyncio.sleep(fault.pause_s)
                if fault.lose_disk:
                    shutil.rmtree(worker.data_dir, ignore_errors=True)
                await worker.start(wait=False)
                self._killed.discard(n)
                self._note(
                    f"kill9: worker-{n} restarted"
                    + (" without its state directory" if fault.lose_disk else "")
                )
            else:
                await self._zombie(n, worker)
            return
        if kind == "broker_restart":
            self._note("broker_restart: stopping the Kafka broker (SIGTERM)")
            took = await faults.restart_broker(down_s=fault.pause_s)
            self._note(f"broker_restart: broker back, {took:.1f}s after the stop")
            self.run.carried_out.append(kind)
            return
        if kind == "pg_restart":
            self._note("pg_restart: stopping PostgreSQL (fast)")
            took = await faults.restart_postgres(self.settings.pg_dsn, down_s=fault.pause_s)
            self._note(f"pg_restart: PostgreSQL back after {took:.1f}s")
            self.run.carried_out.append(kind)
            return
        if kind == "redis_flush":
            keys = await faults.flush_redis(self.settings.redis_url)
            self._note(f"redis_flush: FLUSHDB dropped {keys} keys")
            self.run.carried_out.append(kind)
            return
        raise ValueError(f"unknown fault {kind!r}")

    async def _serving(self, worker: EngineProcess) -> list[int]:
        """The shards a live worker serves, by its /readyz; none if it does not answer."""
        try:
            body = await asyncio.wait_for(worker.readyz(), 5)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return []
        return [int(p) for p in body.get("serving", [])]

    async def _pick_serving(self, fault: Fault) -> tuple[int, EngineProcess] | None:
        """Like `_pick`, among the live workers that serve a shard (a zombie that served
        nothing would have nothing to be fenced from)."""
        live = self._live()
        serving = [w for w in live if await self._serving(w)] or live
        if not serving:
            return None
        worker = serving[min(len(serving) - 1, int(fault.pick * len(serving)))]
        return self.workers.index(worker), worker

    async def _zombie(self, n: int, worker: EngineProcess) -> None:
        """SIGSTOP `worker` past its session timeout, and keep it stopped until every
        shard it served is served by another worker (bounded), then SIGCONT: a zombie
        whose shards have moved on and who must have been fenced."""
        assert worker.proc is not None
        served = await self._serving(worker)
        worker.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        self._note(f"sigstop: worker-{n} stopped (SIGSTOP), serving {served}")
        taken: set[int] = set()
        while True:
            await asyncio.sleep(0.5)
            others = [w for w in self._live() if w is not worker]
            now = set()
            for other in others:
                now |= set(await self._serving(other))
            taken = now & set(served)
            elapsed = time.monotonic() - stopped
            if elapsed >= STOP_S and (taken == set(served) or elapsed >= STOP_S + STOP_MORE_S):
                break
        worker.proc.send_signal(signal.SIGCONT)
        zombie = Zombie(n, served, sorted(taken), round(time.monotonic() - stopped, 1))
        self.run.zombies.append(zombie)
        self.run.carried_out.append("sigstop")
        self._note(
            f"sigstop: worker-{n} continued (SIGCONT) after {zombie.stopped_s:.0f}s;"
            f" of its shards {served}, {zombie.taken_over} were served by others"
        )

    # After the load ----------------------------------------------------------------------

    async def _heal(self) -> None:
        """Every worker running again (a stopped one continued, a dead one restarted)."""
        for n, worker in enumerate(self.workers):
            if worker.proc is None or n in self._retired:
                continue
            if worker.proc.returncode is None:
                worker.proc.send_signal(signal.SIGCONT)
            else:
                if n not in self._killed:
                    self.deaths.append(f"worker-{n} exited {worker.proc.returncode}")
                self._note(f"heal: worker-{n} had exited ({worker.proc.returncode}); restarted")
                await worker.start(wait=False)
        serving = [w for n, w in enumerate(self.workers) if n not in self._retired]
        try:
            await asyncio.gather(*(w.wait_ready() for w in serving))
        except Exception as exc:
            raise ChaosError(f"a worker did not come back: {exc}") from exc

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
                for worker in self.workers:
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
        self._note(f"engine drained ({last})")
        if not await verify.wait_drained(self.sinks, timeout_s=DRAIN_TIMEOUT_S, quiet_s=2.0):
            raise ChaosError(f"the sinks did not drain in {DRAIN_TIMEOUT_S:.0f}s")
        self._note("sinks drained")

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
                not self.deaths,
                "; ".join(self.deaths) or f"{len(self.workers)} workers",
            ),
            *_check_results(commands, internal, results),
            _check_seq(results),
            _check_conservation(commands, results),
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
                "Redis", final, await verify.redis_balances(s.redis_url, s.topic_prefix)
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

        live = self._live()
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


def _is_decision(result: Result) -> bool:
    return result.status is not Status.DUPLICATE and not (
        result.reason is not None and result.reason.value == "command_id_reused"
    )


def _check_results(
    commands: list[Any], internal: list[Any], results: list[tuple[Any, Result]]
) -> list[Check]:
    """One result per command record; one decision per client (account, command id);
    one result per internal command, and every internal command a decision implies
    exists. A copy the engine forwarded from a wrong partition is not a record of its
    own: its result names (tally-source) the record the client produced."""
    by_source: Counter[bytes] = Counter()
    by_id: dict[str, list[Result]] = defaultdict(list)
    by_key: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for record, result in results:
        found = source_in(record.headers)
        if found is not None:
            by_source[found] += 1
        by_id[result.command_id].append(result)
        by_key[(result.account, result.command_id)].append(result)
    garbage = 0
    answerable: dict[bytes, tuple[str, str]] = {}  # source -> (account, command id)
    for record in commands:
        if source_in(record.headers) is not None:
            continue  # a forwarded copy
        decoded = decode_command(record.value or b"")
        if isinstance(decoded, Undecodable):
            garbage += 1
            continue
        answerable[source(record.partition, record.offset)] = (
            decoded.account,
            decoded.command_id,
        )
    missing = [src for src in answerable if by_source[src] == 0]
    doubled = [src for src in answerable if by_source[src] > 1]
    orphans = [src for src in by_source if src not in answerable]
    one_each = Check(
        "exactly one result per command record",
        not missing and not doubled and not orphans,
        f"{len(answerable)} records (+{garbage} garbage): {len(missing)} without a result,"
        f" {len(doubled)} with several, {len(orphans)} results for no record"
        + (f"; e.g. {(missing + doubled + orphans)[:3]}" if missing or doubled or orphans else ""),
    )
    client_ids = set(answerable.values())
    decisions = {i: sum(_is_decision(r) for r in by_key.get(i, [])) for i in client_ids}
    not_one = {i: n for i, n in decisions.items() if n != 1}
    duplicates = sum(1 for i in client_ids for r in by_key.get(i, []) if not _is_decision(r))
    one_decision = Check(
        "one decision per (account, command id)",
        not not_one,
        f"{len(client_ids)} ids, {duplicates} repeats answered duplicate/reused"
        + (
            f"; {len(not_one)} ids with another count, e.g. {list(not_one.items())[:3]}"
            if not_one
            else ""
        ),
    )
    internal_ids: Counter[str] = Counter()
    for record in internal:
        decoded = decode_command(record.value or b"", internal=True)
        if not isinstance(decoded, Undecodable):
            internal_ids[decoded.command_id] += 1
    repeated_records = [i for i, n in internal_ids.items() if n > 1]
    wrong = [i for i in internal_ids if len(by_id.get(i, [])) != 1]
    implied = {i for rs in by_id.values() for r in rs if _is_decision(r) for i in implied_ids(r)}
    absent = sorted(implied - set(internal_ids))
    expiries = [i for i in by_id if i.startswith("expire.")]
    expiry_wrong = [i for i in expiries if len(by_id[i]) != 1]
    internal_check = Check(
        "one result per internal command (credits, refunds, expiries)",
        not repeated_records and not wrong and not absent and not expiry_wrong,
        f"{len(internal_ids)} credits/refunds, {len(expiries)} expiries:"
        f" {len(repeated_records)} written twice, {len(wrong)} without exactly one result,"
        f" {len(absent)} implied but never written, {len(expiry_wrong)} expiries answered"
        " other than once",
    )
    return [one_each, one_decision, internal_check]


def _check_seq(results: list[tuple[Any, Result]]) -> Check:
    seqs: dict[tuple[str, str], list[int]] = defaultdict(list)
    for _, result in results:
        for e in result.entries:
            seqs[(e.account, e.asset)].append(e.seq)
    bad = {k: v for k, v in seqs.items() if sorted(v) != list(range(1, len(v) + 1))}
    entries = sum(len(v) for v in seqs.values())
    return Check(
        "every balance's seq is 1..n, each once",
        not bad,
        f"{len(seqs)} balances, {entries} entries"
        + (f"; {len(bad)} balances with a gap or a repeat, e.g. {next(iter(bad))}" if bad else ""),
    )


def _check_conservation(commands: list[Any], results: list[tuple[Any, Result]]) -> Check:
    """Per asset: money moved inside the engine (transfers, disbursements, holds,
    captures to an account, and their credits and refunds) nets to zero, and the sum of
    the final balances equals deposits - withdrawals - captures paid out."""
    paid_out: set[str] = set()
    for record in commands:
        decoded = decode_command(record.value or b"")
        if isinstance(decoded, Capture) and decoded.to is None:
            paid_out.add(decoded.command_id)
    moved: Counter[str] = Counter()
    flows: Counter[str] = Counter()
    final: dict[tuple[str, str], tuple[int, int]] = {}
    last_seq: dict[tuple[str, str], int] = {}
    for _, result in results:
        for e in result.entries:
            delta = e.delta_available + e.delta_held
            external = result.kind in ("deposit", "withdraw") or (
                result.kind == "capture" and result.command_id in paid_out
            )
            (flows if external else moved)[e.asset] += delta
            key = (e.account, e.asset)
            if e.seq > last_seq.get(key, 0):
                last_seq[key] = e.seq
                final[key] = (e.available, e.held)
    totals: Counter[str] = Counter()
    for (_, asset), (available, held) in final.items():
        totals[asset] += available + held
    assets = sorted(set(moved) | set(flows) | set(totals))
    wrong = [a for a in assets if moved[a] != 0 or totals[a] != flows[a]]
    return Check(
        "conservation per asset",
        not wrong,
        "; ".join(
            f"{a}: balances {totals[a]} = in-out {flows[a]}, internal net {moved[a]}"
            for a in assets
        ),
    )


def _check_dead_letters(commands: list[Any], letters: list[DeadLetter]) -> Check:
    garbage = Counter(
        (r.topic, r.partition, r.offset)
        for r in commands
        if isinstance(decode_command(r.value or b""), Undecodable)
    )
    found = Counter((d.source_topic, d.source_partition, d.source_offset) for d in letters)
    return Check(
        "dead letters are exactly the garbage sent",
        found == garbage,
        f"{sum(garbage.values())} garbage records, {sum(found.values())} dead letters"
        + (
            ""
            if found == garbage
            else f"; differ at {sorted(set(found.items()) ^ set(garbage.items()))[:3]}"
        ),
    )


def render(run: Run) -> str:
    lines = [
        f"chaos run seed={run.seed} duration={run.duration_s:.0f}s rate={run.rate}/s"
        f" prefix={run.prefix}: {'PASSED' if run.ok else 'FAILED'} in {run.seconds:.0f}s",
        f"  load: {run.produced} records acknowledged by Kafka, {run.resent} sent again",
        "  fault plan:",
        *(f"    {f.line()}" for f in run.plan),
        "  what happened:",
        *(f"    {line}" for line in run.injected),
        f"  injected: {', '.join(run.carried_out) or 'nothing'}"
        + (f"; NOT injected: {'; '.join(run.skipped)}" if run.skipped else ""),
        "  checks:",
    ]
    width = max((len(c.name) for c in run.checks), default=10)
    lines += [
        f"    [{'ok' if c.ok else 'FAIL':>4}] {c.name:<{width}}  {c.detail}" for c in run.checks
    ]
    lines += ["  sinks:", *(f"    {line}" for line in run.sinks)]
    lines.append("  workers:")
    for n, w in enumerate(run.workers):
        counts = w.get("counts", {})
        shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        lines.append(f"    worker-{n}: serving {w.get('serving', '?')}; {shown}; log {w['log']}")
    if not run.ok:
        lines.append(
            f"  reproduce: make chaos SEED={run.seed} DURATION={run.duration_s:.0f}"
            f"  (or: tally chaos --seed {run.seed} --duration {run.duration_s:.0f})"
        )
    return "\n".join(lines)
