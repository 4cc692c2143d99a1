"""`tally bench http`: signed commands through the HTTP ingress, measured with wrk.

What is measured. The ingress runs as it is deployed, `tally ingress` (with
`--processes N`, N processes on one port through SO_REUSEPORT), on a deployment of its
own, with one client key configured and its rate limit raised so that it never throttles
the benchmark. No engine runs: a 202 means the ingress checked the request's signature,
parsed the command and the broker acknowledged it (acks=all, idempotent producer). The
load generator is wrk (Debian's package), a separate process on loopback, for a bounded
time per phase:

  single  POST /v1/commands, one command per request: requests/s answered 202, and wrk's
          p50/p99 latency (closed loop: each connection sends its next request when the
          last one was answered);
  batch   POST /v1/commands/batch, --batch-size commands per request: commands/s
          accepted.

wrk's Lua has no HMAC, so every request is signed beforehand (the ingress accepts a
timestamp within 5 minutes) and written to one file per wrk thread; scripts/wrk/signed.lua
sends each line once. Every request has its own nonce and so its own signature (the
ingress accepts a signature once: a request sent twice would be a 401, not a command),
every command_id is unique, the pool is bounded, and a thread whose pool runs out stops
(reported; the rate is then a lower bound). wrk itself re-sends nothing: a request whose
connection broke is counted as a socket error and its line is not used again. Only 202s count as
successes (and, for a batch, the commands its 202/207 answer accepted); every other status
is reported. Afterwards the records on the commands topic are counted: at least every
accepted command must be there. The topics and the PostgreSQL schema the ingress created
are deleted at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.errors import BenchError
from bench.report import Column, show, table, write_report
from core.settings import Settings
from harness.procs import ROOT, IngressProcess
from harness.scratch import deployment, unique_prefix
from ingress import signing
from ingress.client import Client
from topics.specs import topics_for

WRK_SCRIPT = ROOT / "scripts" / "wrk" / "signed.lua"
KEY_ID = "bench"
CONTENT_TYPE = "application/json"  # what signed.lua sends
NONCE_BYTES = 24  # signed.lua reads the nonce at fixed offsets
SINGLE = "/v1/commands"
BATCH = "/v1/commands/batch"
# The bars of the issue, for this 2-core machine; printed as met or not, never asserted.
single_bar_per_s = 3_000
batch_bar_per_s = 30_000
# Far above anything the bench sends: the per-key token bucket never refuses.
bench_rate_per_s = 10_000_000
# The pre-signed pools are sized for these rates over the whole phase: several times
# what a 2-core machine reaches, so that a run does not exhaust them.
single_pool_per_s = 25_000
batch_pool_per_s = 200_000
warm_up_commands = 200
accounts = 10_000
wrk_grace_s = 60.0
_RESULT = re.compile(r"^TALLY-RESULT (\{.*\})$", re.MULTILINE)
PHASE_COLUMNS = (
    Column("phase", 32),
    Column("procs", 6),
    Column("conns", 6),
    Column("requests/s", 12, ",.0f"),
    Column("commands/s", 12, ",.0f"),
    Column("p50 ms", 8, ".1f"),
    Column("p99 ms", 8, ".1f"),
    Column("non-2xx", 8),
    Column("bar", 0, left=True, gap=2),
)


@dataclass
class Phase:
    phase: str
    processes: int
    connections: int
    wrk_threads: int
    batch_size: int
    duration_s: float
    pool_requests: int
    responses: int
    accepted_requests: int
    accepted_commands: int
    requests_per_s: float
    commands_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    non_2xx: int
    socket_errors: int
    pool_exhausted: bool
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass
class Config:
    processes: int
    prefix: str
    phases: list[Phase]
    records_on_topic: int
    accepted_total: int


def _command(run: str, n: int) -> bytes:
    return (
        f'{{"kind":"deposit","command_id":"{run}-{n}","account":"acct-{n % accounts}",'
        f'"asset":"USD","amount":1}}'
    ).encode()


def write_pool(
    path: Path,
    *,
    secret: bytes,
    target: str,
    run: str,
    requests: int,
    batch_size: int,
    threads: int,
) -> int:
    """Write `requests` signed requests (of `batch_size` commands when target is the batch
    endpoint) to path.0 ... path.<threads-1>, one line each: timestamp, nonce, signature,
    body (see scripts/wrk/signed.lua). Returns the number written; command ids are
    `run`-0, `run`-1, ... each used once, and every line has a nonce of its own."""
    timestamp = str(int(time.time()))
    assert len(timestamp) == 10
    per_thread = max(1, -(-requests // threads))
    n = 0
    written = 0
    for t in range(threads):
        with open(f"{path}.{t}", "wb") as f:
            lines: list[bytes] = []
            for _ in range(per_thread):
                # Unique in the pool (the command counter), fixed width for the Lua.
                nonce = f"n{n:0{NONCE_BYTES - 1}d}"
                if target == BATCH:
                    commands = b",".join(_command(run, n + i) for i in range(batch_size))
                    body = b'{"commands":[' + commands + b"]}"
                    n += batch_size
                else:
                    body = _command(run, n)
                    n += 1
                sig = signing.signature(
                    secret, "POST", target, timestamp, nonce, KEY_ID, body,
                    content_type=CONTENT_TYPE,
                )  # fmt: skip
                lines.append(f"{timestamp} {nonce} {sig} ".encode() + body + b"\n")
                if len(lines) >= 5000:
                    f.writelines(lines)
                    lines.clear()
            f.writelines(lines)
            written += per_thread
    return written


async def _wrk(
    url: str,
    target: str,
    pool: Path,
    *,
    mode: str,
    threads: int,
    connections: int,
    duration_s: int,
) -> dict[str, Any]:
    args = [
        "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration_s}s",
        "--timeout", "10s", "-s", str(WRK_SCRIPT), url + target,
        "--", str(pool), target, KEY_ID, mode,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), duration_s + wrk_grace_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"wrk did not finish within {duration_s + wrk_grace_s:.0f}s") from None
    text = out.decode(errors="replace")
    match = _RESULT.search(text)
    if proc.returncode != 0 or match is None:
        stderr = err.decode(errors="replace")
        raise BenchError(f"wrk exited {proc.returncode} without a result:\n{text}\n{stderr}")
    result: dict[str, Any] = json.loads(match.group(1))
    return result


async def _phase(
    ingress: IngressProcess,
    workdir: Path,
    *,
    secret: bytes,
    run: str,
    target: str,
    batch_size: int,
    processes: int,
    threads: int,
    connections: int,
    duration_s: int,
    say: Callable[[str], None],
) -> Phase:
    batch = target == BATCH
    name = "batch" if batch else "single"
    if batch:
        requests = max(threads, -(-batch_pool_per_s * duration_s // batch_size))
    else:
        requests = single_pool_per_s * duration_s
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f"{name}-pool-") as tmp:
        pool = Path(tmp) / "requests"
        started = time.perf_counter()
        written = await asyncio.to_thread(
            write_pool, pool, secret=secret, target=target, run=f"{run}-{name[0]}",
            requests=requests, batch_size=batch_size, threads=threads,
        )  # fmt: skip
        say(
            f"[http x{processes}] {name}: signed {written:,} requests "
            f"({written * (batch_size if batch else 1):,} commands) in "
            f"{time.perf_counter() - started:.1f}s; wrk -t{threads} -c{connections} "
            f"-d{duration_s}s POST {target}"
        )
        result = await _wrk(
            ingress.url, target, pool, mode=name, threads=threads,
            connections=connections, duration_s=duration_s,
        )  # fmt: skip
    seconds = result["duration_us"] / 1e6
    statuses = {str(k): int(v) for k, v in sorted(result["statuses"].items())}
    ok_requests = statuses.get("202", 0)
    answered = ok_requests + (statuses.get("207", 0) if batch else 0)
    errors = result["errors"]
    latency = result["latency_us"]
    return Phase(
        phase=name,
        processes=processes,
        connections=connections,
        wrk_threads=threads,
        batch_size=batch_size if batch else 1,
        duration_s=seconds,
        pool_requests=written,
        responses=result["responses"],
        accepted_requests=ok_requests,
        accepted_commands=result["accepted"],
        requests_per_s=answered / seconds,
        commands_per_s=result["accepted"] / seconds,
        latency_p50_ms=latency["p50"] / 1000,
        latency_p99_ms=latency["p99"] / 1000,
        latency_max_ms=latency["max"] / 1000,
        non_2xx=sum(n for s, n in statuses.items() if not s.startswith("2")),
        socket_errors=sum(errors[k] for k in ("connect", "read", "write", "timeout")),
        pool_exhausted=result["threads_out_of_pool"] > 0,
        statuses=statuses,
    )


async def _warm_up(url: str, secret: bytes, run: str) -> int:
    """Untimed: connections, the producer's metadata, and a check that the signed requests
    this bench builds are accepted (anything but a 202 stops the bench with its answer)."""
    async with Client(url, KEY_ID, secret) as client:
        for n in range(warm_up_commands):
            answer = await client.request("POST", SINGLE, _command(run, n))
            if answer.status != 202:
                raise BenchError(f"warm-up POST {SINGLE}: {answer.status} {answer.body}")
        commands = [json.loads(_command(run, warm_up_commands + i)) for i in range(100)]
        answer = await client.submit_batch(commands)
        if answer.status != 202:
            raise BenchError(f"warm-up POST {BATCH}: {answer.status} {answer.body}")
    return warm_up_commands + len(commands)


async def _records(bootstrap: str, topic: str, partitions: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        return int(sum(ends.values()))
    finally:
        await consumer.stop()


async def run_config(
    settings: Settings,
    *,
    processes: int,
    duration_s: int,
    connections: int,
    batch_connections: int,
    batch_size: int,
    threads: int,
    workdir: Path,
    say: Callable[[str], None],
) -> Config:
    # No topics made: the ingress makes them at its start, as deployed.
    scratch = deployment(settings, unique_prefix("bench-http"))
    prefix = scratch.prefix
    secret = secrets.token_hex(24).encode()
    run = uuid.uuid4().hex[:8]
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    ingress = IngressProcess(
        settings,
        prefix=prefix,
        log_path=workdir / f"{prefix}.log",
        partitions=settings.partitions,
        keys={KEY_ID: secret.decode()},
        processes=processes,
        ingress_rate_per_s=bench_rate_per_s,
        ingress_rate_burst=bench_rate_per_s,
    )
    topics = topics_for(prefix, settings.partitions)
    say(f"[http x{processes}] starting `tally ingress --processes {processes}` on {ingress.url}")
    try:
        await ingress.start()
        warm = await _warm_up(ingress.url, secret, f"{run}-w")
        phases = [
            await _phase(
                ingress,
                workdir,
                secret=secret,
                run=run,
                target=target,
                batch_size=batch_size,
                processes=processes,
                threads=threads,
                connections=conns,
                duration_s=duration_s,
                say=say,
            )
            for target, conns in ((SINGLE, connections), (BATCH, batch_connections))
        ]
        records = await _records(
            settings.kafka_bootstrap, topics.commands.name, settings.partitions
        )
    finally:
        await ingress.stop()
        await scratch.drop()
    accepted = warm + sum(p.accepted_commands for p in phases)
    if records < accepted:
        raise BenchError(
            f"{prefix}.commands holds {records:,} records but {accepted:,} commands were "
            "answered as accepted: acknowledged commands are missing (or something else "
            "deleted the bench's topics during the run, e.g. a test session's clean-up)"
        )
    return Config(
        processes=processes,
        prefix=prefix,
        phases=phases,
        records_on_topic=records,
        accepted_total=accepted,
    )


def _bar(p: Phase) -> str:
    if p.phase == "single":
        got, bar, unit = p.requests_per_s, single_bar_per_s, "requests/s"
    else:
        got, bar, unit = p.commands_per_s, batch_bar_per_s, "commands/s"
    if got >= bar and not p.non_2xx and not p.socket_errors:
        verdict = "met"
    elif p.pool_exhausted and not p.non_2xx and not p.socket_errors:
        verdict = "unknown (the pool ran out)"
    else:
        verdict = "NOT met"
    return f">= {bar:,} {unit}: {verdict}"


def _row(p: Phase) -> tuple[object, ...]:
    label = f"single {SINGLE}" if p.phase == "single" else f"batch x{p.batch_size} {BATCH}"
    return (label, p.processes, p.connections, p.requests_per_s, p.commands_per_s,
            p.latency_p50_ms, p.latency_p99_ms, p.non_2xx, _bar(p))  # fmt: skip


def render(configs: list[Config], *, duration_s: int) -> list[str]:
    lines = [
        f"HTTP ingress, signed requests from wrk on loopback, {duration_s}s per phase.",
        "Measured: a 202 = signature checked, command parsed, and acknowledged by the broker",
        "(acks=all) on the bench's own commands topic; no engine runs. Only 202s count (and",
        "for a batch the commands its answer accepted); other statuses are listed. Latency is",
        "wrk's per request (closed loop over the connections shown).",
        f"The ingress rate limit is raised to {bench_rate_per_s:,}/s per key",
        "(TALLY_INGRESS_RATE_PER_S, default 5,000) so that it never throttles the bench.",
        "",
        *table(PHASE_COLUMNS, [_row(p) for c in configs for p in c.phases]),
    ]
    for c in configs:
        for p in c.phases:
            other = {s: n for s, n in p.statuses.items() if s != "202"}
            if other or p.socket_errors:
                lines.append(
                    f"  x{c.processes} {p.phase}: statuses {p.statuses}, "
                    f"socket errors {p.socket_errors}"
                )
            if p.pool_exhausted:
                lines.append(
                    f"  x{c.processes} {p.phase}: a wrk thread used up its pre-signed pool "
                    f"({p.pool_requests:,} requests) and stopped: the rate is a lower bound"
                )
        lines.append(
            f"  x{c.processes}: {c.records_on_topic:,} records on {c.prefix}.commands for "
            f"{c.accepted_total:,} accepted commands (warm-up included; requests in flight "
            "when wrk stopped may add some)"
        )
    return lines


async def run(
    settings: Settings,
    *,
    processes: list[int],
    duration_s: int,
    connections: int,
    batch_connections: int,
    batch_size: int,
    threads: int,
    report: Path,
    say: Callable[[str], None] = print,
) -> dict[str, object]:
    if shutil.which("wrk") is None:
        raise BenchError(
            "wrk is not installed: `make services` installs it (or `apt-get install wrk`)"
        )
    workdir = Path(await asyncio.to_thread(os.path.abspath, settings.data_dir)) / "bench"
    configs = [
        await run_config(
            settings,
            processes=n,
            duration_s=duration_s,
            connections=connections,
            batch_connections=batch_connections,
            batch_size=batch_size,
            threads=threads,
            workdir=workdir,
            say=say,
        )
        for n in processes
    ]
    out: dict[str, object] = {
        "duration_s": duration_s,
        "partitions": settings.partitions,
        "rate_limit_per_s": bench_rate_per_s,
        "bars": {
            "single_requests_per_s": single_bar_per_s,
            "batch_commands_per_s": batch_bar_per_s,
        },
        "configs": [asdict(c) for c in configs],
    }
    await asyncio.to_thread(write_report, report, out)
    show(say, render(configs, duration_s=duration_s), report)
    return out
