"""`tally bench recovery`: how long an engine worker takes to rebuild its state from the
changelog, for N balances.

Method. N balances (one account each, spread over the shards by the engine's own shard
function; a balance record and an account record each) are written straight to the
engine's changelog topic, in the engine's key and
value encoding: what a deployment with N balances leaves there. Pushing N commands
through the engine first would measure the engine, not recovery. Then a worker starts
with an empty state directory; recovery is timed from its process start to `/readyz`
answering 200 (which it only does once every shard has been rebuilt), and the worker's
own figure (changelog records read, seconds) is read from its log. A sample of
balances is then read through the worker's table view and compared with what was
written.
"""

from __future__ import annotations

import asyncio
import random
import re
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec

from bench.report import pair, show, write_report
from core.settings import Settings
from harness.procs import EngineProcess, produce
from harness.scratch import scratch, unique_prefix
from streams.state import AccountState, BalanceState
from streams.store import account_key, balance_key
from topics.admin import ensure_topics
from topics.names import changelog_name, engine_group, engine_topic_specs
from topics.shard import shard_of

BAR_S = 60.0
sample_size = 500


@dataclass
class RecoveryResult:
    balances: int
    partitions: int
    seed_per_s: float
    ready_s: float
    engine_recovery_s: float | None
    records_per_s: float
    sample_checked: int
    sample_ok: bool
    bar_met: bool


def account_of(i: int) -> str:
    return f"r{i:08d}"


def balance_of(i: int) -> BalanceState:
    return BalanceState(available=1000 + i, held=i % 7, seq=1 + i % 5)


def changelog_records(n: int, partitions: int) -> list[tuple[str, bytes, int | None]]:
    """N balances as the engine writes them, on each account's shard partition: the
    balance (key b|account|asset) and the account record listing its assets (a|account),
    values in the msgspec array encoding of `streams.state`."""
    encode = msgspec.json.encode
    account_record = encode(AccountState(assets=("USD",)))
    out: list[tuple[str, bytes, int | None]] = []
    for i in range(n):
        account = account_of(i)
        shard = shard_of(account, partitions)
        out.append((account_key(account).decode(), account_record, shard))
        out.append((balance_key(account, "USD").decode(), encode(balance_of(i)), shard))
    return out


async def seed(settings: Settings, app_id: str, n: int) -> float:
    """Create the deployment's topics and write N balances to its changelog; records/s."""
    await ensure_topics(settings.kafka_bootstrap, engine_topic_specs(settings, app_id))
    return await write_changelog(settings, app_id, n)


async def write_changelog(settings: Settings, app_id: str, n: int) -> float:
    """Write N balances to the changelog of `app_id`, which exists; records/s."""
    records = changelog_records(n, settings.partitions)
    return await produce(settings.kafka_bootstrap, changelog_name(app_id), records)


def _engine_figures(log: str) -> tuple[float | None, int]:
    """The worker's own account of its recovery: seconds reading the changelog (summed
    over its shards; None when it logged none) and the records it read."""
    found = re.findall(r"done, ([\d,]+) changelog records in ([\d.]+)s", log)
    engine_s = sum(float(s) for _, s in found) if found else None
    return engine_s, sum(int(n.replace(",", "")) for n, _ in found)


async def _check_sample(
    engine: EngineProcess, balances: int, say: Callable[[str], None]
) -> tuple[int, bool]:
    """Read a seeded sample of the balances back through the worker's table view:
    (how many were to be checked, whether every one read back as written)."""
    sample = random.Random(1).sample(range(balances), min(sample_size, balances))
    for i in sample:
        got = (await engine.balances(account_of(i))).get("USD")
        want = balance_of(i)
        if got is None or (got.available, got.held, got.seq) != (
            want.available,
            want.held,
            want.seq,
        ):
            say(f"[recovery] MISMATCH {account_of(i)}: {got} != {want}")
            return len(sample), False
    return len(sample), True


async def run(
    settings: Settings,
    *,
    balances: int,
    partitions: int,
    workdir: Path,
    report: Path,
    say: Callable[[str], None] = print,
) -> RecoveryResult:
    prefix = unique_prefix("bench-rec")
    data_dir = workdir / prefix
    async with scratch(
        settings, prefix, partitions=partitions, topics="engine", data_dir=data_dir
    ) as deployment:
        app_id = engine_group(deployment.settings)
        say(f"[recovery] writing {balances:,} balances to {changelog_name(app_id)}")
        seed_rate = await write_changelog(deployment.settings, app_id, balances)
        say(f"[recovery] written at {seed_rate:,.0f} records/s; starting a worker on empty state")
        engine = EngineProcess(settings, prefix=prefix, data_dir=data_dir, partitions=partitions)
        try:
            started = time.monotonic()
            await engine.start()  # returns once /readyz is 200: every shard rebuilt
            ready_s = time.monotonic() - started
            engine_s, recovered = _engine_figures(engine.tail(400))
            checked, ok = await _check_sample(engine, balances, say)
        finally:
            await engine.stop()
    result = RecoveryResult(
        balances=balances,
        partitions=partitions,
        seed_per_s=seed_rate,
        ready_s=ready_s,
        engine_recovery_s=engine_s,
        records_per_s=recovered / engine_s if engine_s else 0.0,
        sample_checked=checked,
        sample_ok=ok,
        bar_met=balances >= 1_000_000 and ready_s < BAR_S and ok,
    )
    show(say, lines(result))
    return result


def lines(result: RecoveryResult) -> list[str]:
    """The printed result: one labelled value a line."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = [
        "engine state recovery from the changelog (empty state directory)",
        pair("balances", f"{result.balances:,}"),
        pair("shards", result.partitions),
        pair("start to /readyz 200", f"{result.ready_s:.1f}s"),
    ]
    if result.engine_recovery_s is not None:
        rate = f"{result.records_per_s:,.0f}/s"
        out.append(
            pair("of which reading the changelog", f"{result.engine_recovery_s:.1f}s", f" ({rate})")
        )
    out.append(
        pair(
            "sample read back",
            result.sample_checked,
            f" {'ok' if result.sample_ok else 'MISMATCH'}",
        )
    )
    verdict = "met" if result.bar_met else "NOT met"
    if result.balances < 1_000_000:
        verdict = f"n/a (ran {result.balances:,})"
    out.append(pair("bar: 1M balances < 60 s", verdict))
    out.append(f"(bench process peak RSS {peak_mb:,.0f} MB)")
    return out


def main(settings: Settings, *, balances: int, partitions: int, report: Path) -> int:
    workdir = Path(settings.data_dir).resolve() / "bench"
    result = asyncio.run(
        run(settings, balances=balances, partitions=partitions, workdir=workdir, report=report)
    )
    write_report(report, asdict(result))
    print(f"\nreport written to {report}")
    return 0 if result.sample_ok else 1
