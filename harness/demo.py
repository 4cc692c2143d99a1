"""The main job: the engine and a realistic workload in one process, checked at the end.

The demo runs in topics and a state directory of its own (prefix `demo-<id>`), so every
run starts from nothing and its conservation check covers exactly its own money; both are
removed afterwards unless `keep` is set.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import msgspec

from core.settings import Settings
from harness import checks
from harness.collector import Collector, all_answered, expected_counts
from harness.procs import free_port, produce
from harness.receiver import Receiver
from harness.scratch import deployment, unique_prefix
from harness.workload import Workload, build
from ingress import service as ingress_service
from ingress.client import Client
from notify.service import Notifier
from sinks import service as sink_service
from sinks import verify
from sinks.runner import SinkRunner
from streams.engine import Engine
from streams.state import BalanceState
from streams.worker import serve
from topics.codec import decode_command
from topics.names import engine_group, schema_name
from topics.schema import PublicCommand
from topics.shard import shard_of

log = logging.getLogger(__name__)

# A share of records produced to a wrong partition, as a CRC32-partitioning client
# (kcat, librdkafka) would: the engine must forward them to their account's shard.
misplaced_share = 0.01
# The accounts whose commands go through the signed HTTP ingress instead of straight to
# Kafka (all of an account's commands take one path, so their order is kept): 1 in 4.
http_accounts_every = 4
# Of those, the first ones go as single-command requests, the rest in batches.
http_singles = 300
http_batch_size = 500
drain_timeout_s = 300.0
# The demo subscribes a receiver of its own (a small aiohttp server on loopback) to the
# transfers and disbursements applied, and `tally notify` runs in the same process.
notify_kinds = ("transfer", "disburse")
notify_timeout_s = 120.0


class DemoJob:
    """Produces the workload once the engine runs, waits for it to drain, checks it."""

    engine: Engine
    sinks: list[SinkRunner]

    def __init__(self, workload: Workload, *, seed: int, say: Callable[[str], None]) -> None:
        self.workload = workload
        self.seed = seed
        self.say = say
        self.ok = False
        self.notified: set[str] = set()  # the command ids the receiver must get

    async def run(self, engine: Engine) -> None:
        """Run beside the engine; the engine stops when this returns."""
        self.engine = engine
        try:
            self.ok = await self._run()
        except Exception:
            log.exception("demo failed")
            self.ok = False

    async def _run(self) -> bool:
        settings = self.engine.settings
        await sink_service.prepare(settings, "postgres")
        self.sinks = [sink_service.runner_for(settings, t) for t in sink_service.TARGETS]
        sink_tasks = [asyncio.create_task(r.run(), name=r.store.name) for r in self.sinks]
        self.key = ("demo", secrets.token_hex(16))
        http = msgspec.structs.replace(
            settings,
            ingress_port=free_port(),
            ingress_keys=f"{self.key[0]}:{self.key[1]}",
            ingress_rate_per_s=0,
            # The demo's receiver is on loopback, which production refuses.
            notify_allow_private=True,
            notify_port=free_port(),
        )
        ingress = await ingress_service.start(http)
        self.ingress_url = f"http://{http.ingress_host}:{http.ingress_port}"
        self.receiver = Receiver(secrets.token_hex(16).encode())
        notifier = Notifier(http)
        notify_task: asyncio.Task[None] | None = None
        try:
            await self._subscribe(await self.receiver.start())
            notify_task = asyncio.create_task(notifier.run(), name="notify")
            ok = await self._run_workload()
            return await self._deliveries(notify_task) and ok
        finally:
            notifier.stop()
            if notify_task is not None:
                await asyncio.gather(notify_task, return_exceptions=True)
            await self.receiver.stop()
            await ingress.cleanup()
            for runner in self.sinks:
                runner.stop()
            await asyncio.gather(*sink_tasks, return_exceptions=True)

    async def _run_workload(self) -> bool:
        settings = self.engine.settings
        collector = Collector(settings.kafka_bootstrap, self.engine.topics)
        await collector.start(from_end=True)
        try:
            started = time.monotonic()
            misplaced = await self._produce()
            produced_s = time.monotonic() - started
            self.say(
                f"produced {len(self.workload.records)} records in {produced_s:.1f}s "
                f"({misplaced} to a wrong partition on purpose)"
            )
            expected = expected_counts(r.command_id for r in self.workload.records)
            answered = await collector.wait_for(
                all_answered(expected), timeout_s=drain_timeout_s, say=self.say
            )
            applied_s = time.monotonic() - started
            if not answered:
                self.say(f"FAILED: not every record was answered in {drain_timeout_s}s")
                return False
            self.say(
                f"all {sum(expected.values())} client records answered in {applied_s:.1f}s: "
                f"{sum(expected.values()) / applied_s:,.0f} commands/s end to end"
            )
            await self._drain(collector)
            ok = self._report(collector, expected, applied_s)
            self.notified = {
                r.command_id
                for results in collector.results.by_id.values()
                for r in results
                if r.kind in notify_kinds and r.status.value == "applied"
            }
            return await self._stores() and ok
        finally:
            await collector.stop()

    async def _subscribe(self, url: str) -> None:
        """Subscribe the receiver through the signed API, before any command is sent
        (a subscription gets the events decided from its creation on)."""
        body = {
            "url": url,
            "secret": self.receiver.secret.decode(),
            "filter": {"kinds": list(notify_kinds), "statuses": ["applied"]},
        }
        async with Client(self.ingress_url, *self.key) as tally:
            answer = await tally.request("POST", "/v1/subscriptions", msgspec.json.encode(body))
        if answer.status != 201:
            raise RuntimeError(f"subscribing answered {answer.status}: {answer.body}")

    async def _deliveries(self, notify_task: asyncio.Task[None]) -> bool:
        """Every applied transfer and disbursement delivered to the receiver, signed."""
        want = self.notified
        deadline = time.monotonic() + notify_timeout_s
        while time.monotonic() < deadline and not notify_task.done():
            if want <= set(self.receiver.delivered.values()):
                break
            await asyncio.sleep(0.2)
        got = set(self.receiver.delivered.values())
        ok = want <= got and not self.receiver.bad_signatures and not notify_task.done()
        self.say("")
        self.say(
            f"tally notify: {len(want)} applied transfers and disbursements, "
            f"{len(want & got)} delivered to the demo's receiver and acknowledged "
            f"({len(self.receiver.delivered)} delivery ids, {self.receiver.repeats} repeats, "
            f"{self.receiver.bad_signatures} bad signatures)"
        )
        self.say("RESULT: " + ("every delivery acknowledged" if ok else "DELIVERIES MISSING"))
        return ok

    async def _produce(self) -> int:
        """Produce the workload: a quarter of the accounts' commands through the signed
        HTTP ingress, the rest straight to Kafka with a seeded share of those on a wrong
        partition. Return how many records were misplaced on purpose."""
        partitions = self.engine.settings.partitions
        rng = random.Random(self.seed)
        records: list[tuple[str, bytes, int | None]] = []
        http: list[PublicCommand] = []
        for record in self.workload.records:
            if zlib.crc32(record.key.encode()) % http_accounts_every == 0:
                decoded = decode_command(record.value)  # garbage and invalid go to Kafka
                if isinstance(decoded, PublicCommand):
                    http.append(decoded)
                    continue
            partition = None
            if rng.random() < misplaced_share:
                partition = (shard_of(record.key, partitions) + 1) % partitions
            records.append((record.key, record.value, partition))
        direct = produce(
            self.engine.settings.kafka_bootstrap, self.engine.topics.commands.name, records
        )
        await asyncio.gather(direct, self._send_http(http))
        return sum(p is not None for _, _, p in records)

    async def _send_http(self, commands: list[PublicCommand]) -> None:
        """Send commands through the ingress in order: singles first, then batches.
        Every one must be answered 202 (in Kafka); anything else stops the demo."""
        singles, rest = commands[:http_singles], commands[http_singles:]
        async with Client(self.ingress_url, *self.key) as tally:
            for command in singles:
                answer = await tally.submit(command)
                if answer.status != 202:
                    raise RuntimeError(f"ingress answered {answer.status}: {answer.body}")
            batches = 0
            for batch in _batches(rest, http_batch_size):
                answer = await tally.submit_batch(batch)
                if answer.status != 202:
                    raise RuntimeError(f"ingress answered {answer.status}: {answer.body}")
                batches += 1
        self.say(
            f"sent {len(commands)} commands through the signed HTTP ingress "
            f"({len(singles)} single requests, {batches} batches), all answered 202"
        )

    async def _drain(self, collector: Collector) -> None:
        """Wait for credits, refunds and hold expiries to finish, then for quiet."""
        wait_until = self.workload.hold_expiry_max_ms / 1000 + 3
        if wait_until > time.time():
            self.say(f"waiting {wait_until - time.time():.0f}s for the last holds to expire")
        await collector.wait_for(
            lambda r: (
                not r.pending_internal()
                and time.time() > wait_until
                and time.monotonic() - r.last_at > 2.0
            ),
            timeout_s=drain_timeout_s,
            say=self.say,
        )

    def _report(self, collector: Collector, expected: dict[str, int], seconds: float) -> bool:
        results = collector.results
        balances = self._balances()
        self.say("")
        self.say("results by status and reason:")
        for status, n in sorted(results.statuses().items(), key=lambda kv: -kv[1]):
            self.say(f"  {status:<40}{n:>8}")
        self.say(f"  {'dead-lettered':<40}{len(results.dead_letters):>8}")
        self.say(f"  {'forwarded (wrong partition)':<40}{self.engine.counts['forwarded']:>8}")
        self.say("")
        self.say(f"{len(balances)} balances in the engine's tables; checks:")
        found = checks.run_checks(
            expected=expected,
            garbage=self.workload.garbage,
            results=results,
            balances=balances,
        )
        self.say(checks.render(found))
        ok = all(c.ok for c in found)
        self.say("")
        self.say("RESULT: " + ("all checks hold" if ok else "CHECKS FAILED"))
        return ok

    async def _stores(self) -> bool:
        """The sinks' stores, drained, against the engine's tables."""
        settings = self.engine.settings
        if not await verify.wait_drained(self.sinks, timeout_s=drain_timeout_s):
            self.say("FAILED: the sinks did not catch up with the events topic")
            return False
        engine = {k: (b.available, b.held, b.seq) for k, b in self._balances().items()}
        found = await verify.agreement(
            settings.pg_dsn,
            schema_name(settings),
            settings.redis_url,
            settings.topic_prefix,
            engine,
            cluster=settings.redis_cluster,
        )
        self.say("")
        written = ", ".join(
            f"{r.store.name} {r.written_events} events / {r.written_entries} entries"
            for r in self.sinks
        )
        self.say(f"sinks drained ({written}); stores against the engine:")
        for comparison in found:
            self.say(comparison.line())
        ok = all(c.ok for c in found)
        self.say("")
        self.say(
            "RESULT: " + ("PostgreSQL and Redis agree with the engine" if ok else "STORES DISAGREE")
        )
        return ok

    def _balances(self) -> dict[tuple[str, str], BalanceState]:
        return {
            (account, asset): bal
            for store in self.engine.stores.values()
            for account, asset, bal in store.balances()
        }


def _batches(commands: list[PublicCommand], size: int) -> list[list[PublicCommand]]:
    """The commands in order, cut into batches of at most `size` in which no (account,
    command_id) appears twice: the ingress refuses a batch that gives one twice, so the
    workload's retries go in a later batch, as a client would send them."""
    out: list[list[PublicCommand]] = []
    seen: set[tuple[str, str]] = set()
    for command in commands:
        key = (command.account, command.command_id)
        if not out or len(out[-1]) >= size or key in seen:
            out.append([])
            seen = set()
        out[-1].append(command)
        seen.add(key)
    return out


def run(
    settings: Settings,
    *,
    count: int,
    accounts: int,
    seed: int,
    keep: bool = False,
    say: Callable[[str], None] = print,
) -> bool:
    """Run the demo in this process; True when every check held."""
    prefix = unique_prefix("demo", 8)
    run_id = prefix.removeprefix("demo-")
    data_dir = Path(settings.data_dir) / prefix
    # The engine makes its topics at its start and the job the schema: nothing to create.
    scratch = deployment(settings, prefix, data_dir=data_dir)
    settings = msgspec.structs.replace(scratch.settings, data_dir=str(data_dir))
    workload = build(count=count, accounts=accounts, seed=seed, now_ms=int(time.time() * 1000))
    say(
        f"demo {run_id}: {len(workload.records)} records over {accounts} accounts, "
        f"{settings.partitions} shards, {settings.processing_guarantee}, seed {seed}"
    )
    job = DemoJob(workload, seed=seed, say=say)
    try:
        asyncio.run(serve(settings, app_id=engine_group(settings), job=job.run))
    finally:
        if not keep:
            asyncio.run(scratch.drop())
    return job.ok
