"""`tally bench failover`: how long shards stop answering when one engine worker fails
and comes back, measured from outside (issue #15's bars).

Method. A scratch deployment of N shards and W engine workers in one consumer group.
A steady, paced load of deposits (RATE commands/s, spread evenly over every shard) runs
for DURATION seconds; a read_committed reader of the events topic notes when each
command's result is first seen. Once every shard has answered (warm-up) and a few steady
seconds have passed, the shards each worker serves are read from its /readyz, and one
worker is failed: `kill` (SIGKILL: no chance to leave the group or commit) or `term`
(SIGTERM: a clean stop). It is started again RESTART-AFTER seconds later. When the load
has ended, the run waits (bounded) until every command is answered.

What it reports, per shard and for the two groups of shards (those the surviving
workers served at the time of the fault, and those the failed worker served): the
longest wait for a result and the longest silence (stretch with commands pending and
no result), over the commands produced after warm-up (harness.waits). Every command
must be answered exactly once (one result per command id): a command with no result or
with two fails the run (exit status 1), after the table.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from aiokafka import AIOKafkaProducer

from bench.report import BenchError, Column, show, table, write_report
from core.progress import Progress
from core.settings import Settings
from harness.collector import Collector
from harness.procs import EngineProcess
from harness.scratch import scratch, unique_prefix
from harness.waits import GroupWait, ShardWait, exactly_once, group, owners, shard_waits
from topics.codec import encode
from topics.producer import durable_producer
from topics.schema import Deposit, Transfer
from topics.shard import shard_of

Fault = Literal["kill", "term"]
FAILED_AS = {"kill": "killed", "term": "stopped"}
# Accounts per shard that the load cycles over (the shard's commands are spread on them).
accounts_per_shard = 4
# What each account's first deposit brings: enough for every transfer of a run.
funding_amount = 10**12
# Bounds: every shard answering after the workers are ready, and every command answered
# after the load has ended.
warmup_timeout_s = 60.0
drain_timeout_s = 60.0
# Examples of unanswered or doubled ids printed with the error.
examples = 5

SHARD_COLUMNS = (
    Column("shard", 6),
    Column("group", 10, left=True, gap=1),
    Column("owner", 7),
    Column("after", 7),
    Column("commands", 10, ",d"),
    Column("answered", 10, ",d"),
    Column("max wait s", 12, ".2f"),
    Column("max silence s", 15, ".2f"),
)
GROUP_COLUMNS = (
    Column("shards of", 30),
    Column("shards", 8, "d"),
    Column("commands", 10, ",d"),
    Column("unanswered", 12, ",d"),
    Column("max wait s", 12, ".2f"),
    Column("max silence s", 15, ".2f"),
)


@dataclass
class FailoverResult:
    fault: str
    workers: int
    partitions: int
    rate: int
    restart_after_s: float
    duration_s: float
    transfer_share: float  # of the commands, transfers to another shard (the rest deposits)
    victim: int  # the index of the worker failed
    exit_code: int  # of the failed worker (-9 after a kill, 0 after a clean stop)
    # Seconds after the start of the load.
    warm_s: float
    fault_s: float
    restart_s: float
    load_end_s: float
    answered_s: float  # every command answered (or the drain gave up)
    owners_before: dict[int, int]
    owners_after: dict[int, int]
    produced: int
    results: int
    unanswered: list[str]
    doubled: list[str]
    groups: list[GroupWait]
    shards: list[ShardWait]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unanswered and not self.doubled


class PacedLoad:
    """Commands at a steady `rate`, the shards in turn (each shard gets rate/N a second),
    each record's send time noted under its command id, which is used once.

    Deposits, or with `transfer_share` > 0 that share of transfers to an account of the
    next shard (after one funding deposit per account): a transfer's credit travels to
    the payee's shard through the internal topic, in the payer's transaction, so a
    worker killed mid-transaction leaves records there that other shards wait behind
    (read_committed) until the transaction is aborted."""

    def __init__(
        self, bootstrap: str, topic: str, partitions: int, rate: int, transfer_share: float = 0.0
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.rate = rate
        self.transfer_share = transfer_share
        self.run_id = uuid.uuid4().hex[:6]
        self.accounts = _accounts(self.run_id, partitions)
        self.sent: dict[str, tuple[int, float]] = {}  # command id -> (shard, sent at)
        self.failed: list[str] = []  # sends Kafka refused (the run cannot judge those)

    def shard_of_account(self) -> dict[str, int]:
        return {a: s for s, accounts in self.accounts.items() for a in accounts}

    def command(self, i: int, account: str) -> Deposit | Transfer:
        """The `i`th command, on `account`: the first one of each account funds it."""
        command_id = f"fo-{self.run_id}-{i}"
        funded = i >= len(self.shard_of_account())
        share = self.transfer_share
        if funded and int((i + 1) * share) > int(i * share):
            shard, n = next(
                (s, accounts.index(account))
                for s, accounts in self.accounts.items()
                if account in accounts
            )
            payee = self.accounts[(shard + 1) % len(self.accounts)][n]
            return Transfer(command_id=command_id, account=account, to=payee, asset="USD",
                            amount=1)  # fmt: skip
        amount = 1 if funded else funding_amount
        return Deposit(command_id=command_id, account=account, asset="USD", amount=amount)

    async def run(self, until: float) -> None:
        """Send until the monotonic time `until`, then wait for every acknowledgement."""
        producer = durable_producer(self.bootstrap, linger_ms=2)
        await producer.start()
        try:
            await self._send(producer, until)
        finally:
            await producer.stop()

    async def _send(self, producer: AIOKafkaProducer, until: float) -> None:
        shards = self.shard_of_account()
        order = itertools.cycle(_interleaved(self.accounts))
        futures: list[tuple[str, asyncio.Future[object]]] = []
        started = time.monotonic()
        for i in itertools.count():
            due = started + i / self.rate
            if due >= until:
                break
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            account = next(order)
            command = self.command(i, account)
            self.sent[command.command_id] = (shards[account], time.monotonic())
            future = await producer.send(self.topic, key=account.encode(), value=encode(command))
            futures.append((command.command_id, future))
        done = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
        self.failed = [
            i for (i, _), d in zip(futures, done, strict=True) if isinstance(d, Exception)
        ]


def _accounts(run_id: str, partitions: int) -> dict[int, list[str]]:
    """`accounts_per_shard` account ids on every shard, found by the engine's shard
    function."""
    out: dict[int, list[str]] = {s: [] for s in range(partitions)}
    for n in itertools.count():
        account = f"fo-{run_id}-{n}"
        shard = shard_of(account, partitions)
        if len(out[shard]) < accounts_per_shard:
            out[shard].append(account)
        if all(len(a) == accounts_per_shard for a in out.values()):
            return out
    raise AssertionError("unreachable")


def _interleaved(accounts: dict[int, list[str]]) -> Iterator[str]:
    """Shard 0's first account, shard 1's first, ..., then every shard's second..."""
    for i in range(accounts_per_shard):
        for shard in sorted(accounts):
            yield accounts[shard][i]


class Watch:
    """Waits on the run's progress: bounded, showing the results read so far, and
    raising at once if the load failed (rather than after the wait)."""

    def __init__(self, load: asyncio.Task[None], progress: Progress, collector: Collector):
        self.load = load
        self.progress = progress
        self.collector = collector
        self.seen = 0

    async def until(self, done: Callable[[], bool], *, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.load.done() and self.load.exception() is not None:
                self.load.result()
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
            self._show()
        self._show()
        return True

    async def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        await self.until(lambda: time.monotonic() >= end, timeout_s=seconds + 1)

    def _show(self) -> None:
        count = self.collector.results.count
        self.progress.add(count - self.seen)
        self.seen = count


async def run(
    settings: Settings,
    *,
    workers: int = 2,
    partitions: int = 8,
    rate: int = 400,
    fault: Fault = "kill",
    restart_after_s: float = 2.0,
    duration_s: float = 30.0,
    steady_s: float = 5.0,
    transfer_share: float = 0.0,
    report: Path | None = None,
    work_root: Path,
    say: Callable[[str], None] = print,
) -> FailoverResult:
    """One failover run; prints its tables and writes `report`. Raises BenchError when
    the run could not measure (the fault would fall after the load)."""
    prefix = unique_prefix("bench-fo")
    workdir = work_root / prefix
    async with scratch(settings, prefix, partitions=partitions, topics="engine") as deployment:
        procs = [
            EngineProcess(
                settings, prefix=prefix, data_dir=workdir / f"worker-{n}", partitions=partitions
            )
            for n in range(workers)
        ]
        topics = procs[0].topics
        collector = Collector(settings.kafka_bootstrap, topics)
        load = PacedLoad(
            settings.kafka_bootstrap, topics.commands.name, partitions, rate, transfer_share
        )
        load_task: asyncio.Task[None] | None = None
        await collector.start(from_end=False)
        progress = Progress(
            "failover", int(rate * duration_s), unit="results", say=say, every_s=3.0
        )
        try:
            say(
                f"[failover] {workers} workers, {partitions} shards, {rate}/s for {duration_s:.0f}s"
                f" on {deployment.prefix}; {fault} after warm-up + {steady_s:.0f}s,"
                f" restart after {restart_after_s:.1f}s"
            )
            await asyncio.gather(*(p.start() for p in procs))
            began = time.monotonic()
            load_task = asyncio.create_task(load.run(began + duration_s))
            answers = collector.results.received_at

            def every_shard_answered() -> bool:
                heard = {load.sent[i][0] for i in list(load.sent) if i in answers}
                return len(heard) == partitions

            watch = Watch(load_task, progress, collector)
            if not await watch.until(every_shard_answered, timeout_s=warmup_timeout_s):
                raise BenchError(f"not every shard answered within {warmup_timeout_s:.0f}s")
            warm = time.monotonic()
            await watch.sleep(steady_s)
            if load_task.done():
                raise BenchError(
                    f"--duration {duration_s:.0f}s ended before the fault (warm-up took"
                    f" {warm - began:.1f}s, then {steady_s:.0f}s steady): give it longer"
                )
            before = await owners(procs)
            victim = min((n for n in before.values()), default=0)
            say(
                f"[failover] owners at the fault: {_owner_line(before)}; failing worker-{victim}"
                f" ({'SIGKILL' if fault == 'kill' else 'SIGTERM'})"
            )
            fault_at = time.monotonic()
            target = procs[victim]
            code = await (target.kill() if fault == "kill" else target.stop())
            await watch.sleep(restart_after_s - (time.monotonic() - fault_at))
            restart_at = time.monotonic()
            await target.start(wait=False)
            say(
                f"[failover] worker-{victim} exited {code}; restarted at"
                f" t+{restart_at - began:.1f}s; watching until every command is answered"
            )
            await watch.until(load_task.done, timeout_s=duration_s + 60)
            await load_task
            load_end = time.monotonic()
            expected = list(load.sent)
            done = await watch.until(
                lambda: all(i in answers for i in expected), timeout_s=drain_timeout_s
            )
            answered_at = time.monotonic()
            await asyncio.sleep(0.5)  # a doubled result would come right behind the first
            after = await owners(procs)
        finally:
            progress.close()
            if load_task is not None:
                load_task.cancel()
                await asyncio.gather(load_task, return_exceptions=True)
            await collector.stop()
            await asyncio.gather(*(p.stop() for p in procs))
        failed_sends = load.failed
        missing, doubled = exactly_once(expected, collector.results.by_id)
        waits = shard_waits(load.sent, answers, until=answered_at, start=warm)
        failed_shards = [s for s, n in before.items() if n == victim]
        survivors = sorted(set(before.values()) - {victim})
        result = FailoverResult(
            fault=fault,
            workers=workers,
            partitions=partitions,
            rate=rate,
            restart_after_s=restart_after_s,
            duration_s=duration_s,
            transfer_share=transfer_share,
            victim=victim,
            exit_code=code,
            warm_s=warm - began,
            fault_s=fault_at - began,
            restart_s=restart_at - began,
            load_end_s=load_end - began,
            answered_s=answered_at - began,
            owners_before=before,
            owners_after=after,
            produced=len(expected),
            results=sum(len(collector.results.by_id.get(i, ())) for i in expected),
            unanswered=missing,
            doubled=doubled,
            groups=[
                group(
                    f"survivors {_names(survivors)}",
                    waits,
                    [s for s, n in before.items() if n != victim],
                ),
                group(f"{FAILED_AS[fault]} worker-{victim}", waits, failed_shards),
            ],
            shards=list(waits.values()),
        )
        if len(before) < partitions:
            result.notes.append(
                f"only {len(before)} of {partitions} shards were served at the fault:"
                " the rest count in neither group"
            )
        if not done:
            result.notes.append(
                f"not every command was answered {drain_timeout_s:.0f}s after the load"
            )
        if failed_sends:
            result.notes.append(f"{len(failed_sends)} sends were refused by Kafka")
    if result.ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        result.notes.append(f"worker logs kept in {workdir}")
    lines = render(result)
    if report is not None:
        await asyncio.to_thread(write_report, report, asdict(result))
    show(say, lines, report)
    return result


def _names(workers: list[int]) -> str:
    return ",".join(f"worker-{n}" for n in workers) or "none"


def _owner_line(owners_: dict[int, int]) -> str:
    by_worker: dict[int, list[int]] = {}
    for shard, n in sorted(owners_.items()):
        by_worker.setdefault(n, []).append(shard)
    return "; ".join(f"worker-{n} {shards}" for n, shards in sorted(by_worker.items()))


def render(result: FailoverResult) -> list[str]:
    """The printed result: the run, one line per shard, the two groups, the verdict."""
    r = result
    failed = set(s for s, n in r.owners_before.items() if n == r.victim)
    out = [
        f"failover: {r.fault} of worker-{r.victim} of {r.workers} (exit {r.exit_code}),"
        f" restart after {r.restart_after_s:.1f}s; {r.partitions} shards, {r.rate}/s"
        + (f", {r.transfer_share:.0%} transfers to another shard" if r.transfer_share else ""),
        f"  t+{r.warm_s:.1f}s every shard answering, t+{r.fault_s:.1f}s fault,"
        f" t+{r.restart_s:.1f}s restart, t+{r.load_end_s:.1f}s load ended,"
        f" t+{r.answered_s:.1f}s all answered",
        f"  owners at the fault: {_owner_line(r.owners_before)}",
        f"  owners after:        {_owner_line(r.owners_after)}",
        "",
        *table(
            SHARD_COLUMNS,
            [
                (
                    w.shard,
                    "failed" if w.shard in failed else "survivor",
                    _worker(r.owners_before.get(w.shard)),
                    _worker(r.owners_after.get(w.shard)),
                    w.commands,
                    w.answered,
                    w.max_wait_s,
                    w.max_silence_s,
                )
                for w in r.shards
            ],
        ),
        "",
        *table(
            GROUP_COLUMNS,
            [
                (g.name, len(g.shards), g.commands, g.unanswered, g.max_wait_s, g.max_silence_s)
                for g in r.groups
            ],
        ),
        "",
        f"exactly once: {r.produced:,} commands produced, {r.results:,} results;"
        f" {len(r.unanswered)} unanswered, {len(r.doubled)} answered more than once"
        + (" (ok)" if r.ok else " (FAILED)"),
        *(f"  note: {n}" for n in r.notes),
    ]
    return out


def _worker(n: int | None) -> str:
    return "-" if n is None else f"w{n}"


def main(settings: Settings, **options: object) -> int:
    """Run, print, and return the exit status: 0 when every command was answered once;
    otherwise a BenchError says how many were not."""
    work_root = Path(settings.data_dir).resolve() / "bench"
    result = asyncio.run(run(settings, work_root=work_root, **options))  # type: ignore[arg-type]
    if not result.ok:
        raise BenchError(
            f"{len(result.unanswered)} commands unanswered"
            f" (e.g. {', '.join(result.unanswered[:examples]) or '-'}),"
            f" {len(result.doubled)} answered more than once"
            f" (e.g. {', '.join(result.doubled[:examples]) or '-'})"
        )
    return 0
