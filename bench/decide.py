"""`tally bench decide`: the engine's per-record work alone, with no Kafka and no clock
but the process's own: the seeded workload generator of `tally bench engine` (the same
mix and accounts per command, but with its expiring holds left in and at time 0), split
by shard as the commands topic would hold it, each shard's records decided (`streams.records`) as
one batch against a real RocksDB `ShardStore`, its changelog built, its outputs'
sizes checked and the batch flushed to RocksDB, as a worker does with a poll.

Wall-clock and CPU rates on a shared machine move with the machine (on the 2-core build
box by half from one minute to the next), which hides a change of a few percent. With
`--instructions` the same run is counted under valgrind's cachegrind instead: the
instructions the process executes, minus those of a run that only builds the workload
and the stores, per record. That count repeats within about 0.4% on that box, so it
tells whether a change made the per-record work smaller; whether the worker gets faster
by as much is for `tally bench engine` to show (memory and caches count there too).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from aiokafka.structs import ConsumerRecord

from bench.errors import BenchError
from bench.report import pair, write_report
from core.settings import Settings
from harness.workload import build
from streams.records import Output, Records, check_sizes
from streams.store import ShardStore
from topics.names import deployment_topics
from topics.shard import shard_of

seed = 1
# As the engine bench's workload: one account per 20 commands.
commands_per_account = 20


def run(
    settings: Settings, *, count: int, partitions: int, setup_only: bool = False
) -> dict[str, Any]:
    """Decide `count` commands over `partitions` shards, one batch a shard; the records,
    outputs and CPU seconds of the deciding (none with `setup_only`)."""
    work = build(count=count, accounts=max(100, count // commands_per_account), seed=seed, now_ms=0)
    topics = deployment_topics(settings)
    records = Records(topics, partitions, Counter(), lambda _: None)
    by_shard: dict[int, list[ConsumerRecord[bytes, bytes]]] = defaultdict(list)
    for record in work.records:
        p = shard_of(record.key, partitions)
        by_shard[p].append(
            ConsumerRecord(
                topics.commands.name, p, len(by_shard[p]), 0, 1, record.key.encode(),
                record.value, None, len(record.key), len(record.value), [],
            )
        )  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="tally-bench-decide-"))
    try:
        stores = {p: ShardStore(root / f"shard-{p}", "bench-changelog") for p in range(partitions)}
        outputs = 0
        started = time.process_time()
        if not setup_only:
            for p, batch in sorted(by_shard.items()):
                store = stores[p]
                out: list[Output] = []
                for record in batch:
                    records.handle(p, store, record, 1_000, out)
                changes = store.changelog()
                check_sizes(out, changes)
                store.flush(len(changes))
                outputs += len(out) + len(changes)
        cpu_s = time.process_time() - started
        for store in stores.values():
            store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"records": count, "outputs": outputs, "cpu_s": cpu_s}


_I_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def _instructions(count: int, partitions: int, *, setup_only: bool) -> int:
    """Instructions this benchmark executes under cachegrind (a child of its own)."""
    argv = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, "-m", "tally.cli", "bench", "decide", "--count", str(count),
        "--partitions", str(partitions), "--report", "",
    ]  # fmt: skip
    if setup_only:
        argv.append("--setup-only")
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    found = _I_REFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise BenchError(f"valgrind failed ({done.returncode}): {done.stderr[-400:]}")
    return int(found.group(1).replace(",", ""))


def main(
    settings: Settings,
    *,
    count: int,
    partitions: int,
    instructions: bool,
    setup_only: bool,
    report: Path | None,
) -> int:
    if instructions:
        if shutil.which("valgrind") is None:
            print("tally bench decide --instructions needs valgrind (apt install valgrind)")
            return 2
        print(f"counting instructions under valgrind: {count:,} commands, twice (slow)")
        total = _instructions(count, partitions, setup_only=False)
        setup = _instructions(count, partitions, setup_only=True)
        per_record = (total - setup) / count
        print(pair("instructions per record", f"{per_record:,.0f}"))
        result: dict[str, Any] = {
            "records": count,
            "partitions": partitions,
            "instructions_per_record": per_record,
        }
    else:
        result = run(settings, count=count, partitions=partitions, setup_only=setup_only)
        result["partitions"] = partitions
        if setup_only:
            return 0
        print(pair("records decided", f"{count:,}"))
        print(pair("outputs and changelog per record", f"{result['outputs'] / count:.2f}"))
        print(pair("CPU per record", f"{result['cpu_s'] / count * 1e6:.1f} µs"))
        print(pair("records per CPU second", f"{count / result['cpu_s']:,.0f}"))
    if report is not None:
        write_report(report, result)
        print(f"\nreport written to {report}")
    return 0
