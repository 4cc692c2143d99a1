"""`tally` commands for the people who develop Tally: the demo, the stack's round trip,
the chaos run and the benchmarks, all against the real local services."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from core.logs import setup_logging
from core.settings import Settings
from tally.common import Command, Group, read_settings, status


@click.command(cls=Command)
@click.option("--count", default=20_000, show_default=True, type=click.IntRange(1, 2_000_000))
@click.option("--accounts", default=1000, show_default=True, type=click.IntRange(2, 1_000_000))
@click.option("--seed", default=7, show_default=True, type=int)
@click.option("--keep", is_flag=True, help="Keep the demo's topics and state afterwards.")
@click.option(
    "--stack-check/--no-stack-check",
    default=True,
    show_default=True,
    help="First round-trip records through Kafka, PostgreSQL and Redis.",
)
def demo(count: int, accounts: int, seed: int, keep: bool, stack_check: bool) -> None:
    """Run the engine and a mixed workload of COUNT commands in this process, then check
    exactly-once results, seq continuity, the tables and conservation."""
    from harness import demo as job

    settings = read_settings()
    setup_logging(settings, "demo", quiet=True)
    if stack_check:
        _roundtrip(settings, count=2000, accounts=100, seed=seed)
        click.echo("")
    sys.exit(status(job.run(settings, count=count, accounts=accounts, seed=seed, keep=keep)))


@click.command(cls=Command)
@click.option("--count", default=5000, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--accounts", default=500, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--seed", default=7, show_default=True, type=int)
def roundtrip_check(count: int, accounts: int, seed: int) -> None:
    """Round trip COUNT deposits through Kafka, PostgreSQL and Redis and check the totals."""
    _roundtrip(read_settings(), count=count, accounts=accounts, seed=seed)


def _roundtrip(settings: Settings, *, count: int, accounts: int, seed: int) -> None:
    from harness import roundtrip

    try:
        report = asyncio.run(roundtrip.run(settings, count=count, accounts=accounts, seed=seed))
    except roundtrip.RoundTripError as exc:
        raise roundtrip.RoundTripError(f"round trip FAILED: {exc}") from exc
    except OSError as exc:
        raise roundtrip.RoundTripError(
            f"a service is unreachable ({exc}); run `make services`"
        ) from exc
    click.echo(roundtrip.render(report))


@click.command(cls=Command)
@click.option(
    "--duration",
    "duration_s",
    default=60,
    show_default=True,
    type=click.IntRange(10, 24 * 3600),
    help="Seconds of load; the faults fall between 10% and 80% of it. Then drain and check.",
)
@click.option("--seed", default=1, show_default=True, type=int, help="Load and fault plan.")
@click.option(
    "--faults",
    "faults_count",
    type=click.IntRange(0, 1000),
    help="How many faults [default: one per 25 s of load, at least 3].",
)
@click.option(
    "--kinds",
    help="Comma-separated fault kinds to draw from; each comes once before any repeats"
    " [default: kill9, sigstop, add_worker, broker_restart, pg_restart, redis_flush, and"
    " on the local clusters broker_kill9, broker_sigstop (Kafka), redis_master_kill9"
    " (Redis)].",
)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(2, 3))
@click.option(
    "--rate", default=300, show_default=True, type=click.IntRange(1, 5000), help="Records/s."
)
@click.option("--accounts", default=200, show_default=True, type=click.IntRange(10, 100_000))
@click.option(
    "--redis-db",
    default=9,
    show_default=True,
    type=click.IntRange(0, 15),
    help="The Redis database of the run, which it FLUSHes (at the start and as a fault);"
    " on a Redis Cluster database 0, the only one.",
)
@click.option("--keep", is_flag=True, help="Keep the run's topics, schema and Redis keys.")
def chaos(
    duration_s: int,
    seed: int,
    faults_count: int | None,
    kinds: str | None,
    workers: int,
    rate: int,
    accounts: int,
    redis_db: int,
    keep: bool,
) -> None:
    """Break a running deployment on a seeded schedule and check that nothing was lost
    or applied twice.

    \b
    Starts WORKERS engine processes in one consumer group (4 shards), the PostgreSQL
    and Redis sinks, and a seeded load of RATE records/s for DURATION seconds; meanwhile
    injects the planned faults: kill9 (a worker killed with SIGKILL and restarted,
    sometimes without its state directory), sigstop (a worker paused past its session
    timeout, then continued: a zombie that must be fenced), add_worker (at 3 workers
    the newest leaves with SIGTERM instead), broker_restart, pg_restart, redis_flush;
    on the local three-broker Kafka cluster broker_kill9 and broker_sigstop (one broker
    killed, or paused a few seconds), and broker_restart stops one of its brokers; on
    the Redis Cluster redis_master_kill9. Per fault it reports the longest wait for a
    result on the shards that kept their owner and on those that moved.
    Then it waits for everything to drain and checks: one
    result per command record, one decision per (account, command id), one result per internal
    command, seq 1..n per balance, conservation per asset, dead letters = the garbage
    sent, the stores hold the events' balances, and `tally audit`.

    Needs the services of `make services` (it restarts the broker and PostgreSQL those
    scripts run). Logs: .cache/chaos/<prefix>/. Exit status: 0 every check passed
    and every planned fault was injected, 1 a check failed or a fault was skipped (the
    seed and plan are printed to reproduce it), 2 the run could not be carried out.
    """
    from harness import chaos
    from harness.chaos import job as chaos_job

    settings = read_settings()
    try:
        picked = chaos_job.kinds_of(kinds, settings)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--kinds") from exc
    run = chaos_job.run(
        settings,
        seed=seed,
        duration_s=duration_s,
        faults_count=chaos_job.faults_for(duration_s, faults_count),
        kinds=picked,
        workers=workers,
        rate=rate,
        accounts=accounts,
        redis_db=redis_db,
        keep=keep,
        work_dir=Path(".cache/chaos").resolve(),
        say=lambda line: click.echo(line, err=True),
    )
    click.echo(chaos.render(run))
    sys.exit(status(run.ok))


@click.group(cls=Group)
def bench() -> None:
    """Benchmarks against the real local services; they print their numbers."""


@bench.command(name="engine")
@click.option("--count", default=200_000, show_default=True, type=click.IntRange(1000, 5_000_000))
@click.option(
    "--guarantee",
    type=click.Choice(["both", "exactly_once", "at_least_once"]),
    default="both",
    show_default=True,
)
@click.option(
    "--report",
    default="reports/bench-engine.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Engine worker processes in one group on the backlog (the scale-out curve).",
)
def bench_engine(count: int, guarantee: str, report: Path, workers: int) -> None:
    """Engine throughput on a backlog of COUNT mixed commands, produce->result latency,
    and the raw aiokafka consume->produce ceiling."""
    from bench import engine as bench_job

    settings = read_settings()
    setup_logging(settings, "bench engine", quiet=True)
    guarantees = ["exactly_once", "at_least_once"] if guarantee == "both" else [guarantee]
    asyncio.run(
        bench_job.run(settings, count=count, guarantees=guarantees, report=report, workers=workers)
    )


@bench.command(name="failover")
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(2, 8),
    help="Engine worker processes in one group; one of them is failed.",
)
@click.option("--partitions", default=8, show_default=True, type=click.IntRange(2, 64))
@click.option(
    "--rate",
    default=400,
    show_default=True,
    type=click.IntRange(10, 5000),
    help="Commands/s, steady, spread evenly over every shard.",
)
@click.option(
    "--fault",
    type=click.Choice(["kill", "term"]),
    default="kill",
    show_default=True,
    help="kill: SIGKILL (no leave, no commit); term: SIGTERM (a clean stop).",
)
@click.option(
    "--restart-after",
    "restart_after_s",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0.0, 60.0),
    help="Seconds from the fault to the restart.",
)
@click.option(
    "--duration",
    "duration_s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(5.0, 600.0),
    help="Seconds of load in all (warm-up, a few steady seconds, the fault, watching);"
    " then at most 60 s more for every command to be answered.",
)
@click.option(
    "--steady",
    "steady_s",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.0, 60.0),
    help="Seconds of load between every shard answering and the fault.",
)
@click.option(
    "--transfers",
    "transfer_share",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="The share of commands that are transfers to an account of another shard (their"
    " credits cross shards through the internal topic); the rest are deposits.",
)
@click.option(
    "--report",
    default="reports/bench-failover.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
)
def bench_failover(
    workers: int,
    partitions: int,
    rate: int,
    fault: str,
    restart_after_s: float,
    duration_s: float,
    steady_s: float,
    transfer_share: float,
    report: Path,
) -> None:  # fmt: skip
    """How long shards stop answering when one engine worker fails and restarts.

    \b
    A steady load of RATE deposits/s over every shard; once every shard answers and
    STEADY seconds passed, one worker is killed (or stopped cleanly) and restarted
    RESTART-AFTER seconds later. Prints, per shard and for the shards of the surviving
    and of the failed worker (owners read from /readyz at the fault), the longest wait
    for a result and the longest silence, and checks that every command was answered
    exactly once (exit status 1 if not).
    """
    from bench import failover as job

    settings = read_settings()
    setup_logging(settings, "bench failover", quiet=True)
    sys.exit(
        job.main(
            settings, workers=workers, partitions=partitions, rate=rate, fault=fault,
            restart_after_s=restart_after_s, duration_s=duration_s, steady_s=steady_s,
            transfer_share=transfer_share, report=report,
        )
    )  # fmt: skip


@bench.command(name="sinks")
@click.option("--events", default=200_000, show_default=True, type=click.IntRange(1000, 5_000_000))
@click.option(
    "--processes",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Run each sink as `tally sink --processes N` for the throughput phase.",
)
@click.option(
    "--report",
    default="reports/bench-sinks.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
)
def bench_sinks(events: int, processes: int, report: Path) -> None:
    """PostgreSQL and Redis sink throughput on EVENTS pre-produced result events, and the
    lag from an event's send to its visibility in each store."""
    from bench import sinks as job

    settings = read_settings()
    setup_logging(settings, "bench sinks", quiet=True)
    asyncio.run(job.run(settings, count=events, processes=processes, report=report))


@bench.command(name="notify")
@click.option("--events", default=20_000, show_default=True, type=click.IntRange(100, 1_000_000))
@click.option(
    "--report",
    default="reports/bench-notify.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
)
def bench_notify(events: int, report: Path) -> None:
    """Deliveries/s from `tally notify` to a fast local receiver on EVENTS pre-produced
    result events, and event-to-delivery latency (p50, p99) at 200 events/s."""
    from bench import notify as job

    settings = read_settings()
    setup_logging(settings, "bench notify", quiet=True)
    asyncio.run(job.run(settings, count=events, report=report))


@bench.command(name="replay")
@click.option("--events", default=200_000, show_default=True, type=click.IntRange(1000, 5_000_000))
@click.option(
    "--report",
    default="reports/bench-replay.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
)
def bench_replay(events: int, report: Path) -> None:
    """`tally replay` from offset 0 into an empty Redis, then an empty PostgreSQL, on
    EVENTS pre-produced result events (one entry each); events/s and entries/s, and
    every event checked to be in the store. Topics, schema and keys are removed after."""
    from bench import replay as job

    settings = read_settings()
    setup_logging(settings, "bench replay", quiet=True)
    asyncio.run(job.run(settings, count=events, report=report))


@bench.command(name="decide")
@click.option("--count", default=20_000, show_default=True, type=click.IntRange(1000, 2_000_000))
@click.option("--partitions", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option(
    "--instructions",
    is_flag=True,
    help="Count the instructions per record under valgrind's cachegrind (slow: about "
    "50 times the run), a figure that repeats on a noisy machine.",
)
@click.option("--setup-only", is_flag=True, hidden=True)  # the baseline --instructions runs
@click.option(
    "--report",
    default="reports/bench-decide.json",
    show_default=True,
    help="Where the JSON report goes ('' for none).",
)
def bench_decide(
    count: int, partitions: int, instructions: bool, setup_only: bool, report: str
) -> None:
    """The engine's per-record work alone, no Kafka: COUNT commands of the engine bench's
    workload generator decided shard by shard against RocksDB stores, their changelog built and
    flushed; CPU per record, or with --instructions the instructions per record."""
    from bench import decide as job

    sys.exit(
        job.main(
            read_settings(),
            count=count,
            partitions=partitions,
            instructions=instructions,
            setup_only=setup_only,
            report=Path(report) if report else None,
        )
    )


@bench.command(name="recovery")
@click.option(
    "--balances", default=1_000_000, show_default=True, type=click.IntRange(1000, 10_000_000)
)
@click.option("--partitions", default=8, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--report",
    default="reports/bench-recovery.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
)
def bench_recovery(balances: int, partitions: int, report: Path) -> None:
    """Engine state recovery: BALANCES written to a changelog, then a worker started on
    an empty state directory, timed to /readyz 200; a sample is read back and checked.
    The bar is 1,000,000 balances in under 60 s."""
    from bench import recovery as job

    sys.exit(job.main(read_settings(), balances=balances, partitions=partitions, report=report))


@bench.command(name="audit")
@click.option(
    "--balances", default=1_000_000, show_default=True, type=click.IntRange(1000, 10_000_000)
)
@click.option(
    "--skip-engine",
    is_flag=True,
    help="Leave the engine out: no changelog, no worker, `tally audit --skip-engine`.",
)
def bench_audit(balances: int, skip_engine: bool) -> None:
    """`tally audit` on a deployment of BALANCES balances: seconds, balances/s, peak RSS.

    The deployment is written straight into PostgreSQL (COPY), Redis and the engine's
    changelog, consistent, as the engine and sinks would leave it; an engine worker
    rebuilds its tables from the changelog; then `tally audit` runs as a child process
    and must exit 0. Everything is removed afterwards. The bar is 1,000,000 balances in
    under 60 s.
    """
    from bench import audit as job

    settings = read_settings()
    setup_logging(settings, "bench audit", quiet=True)
    sys.exit(job.main(settings, balances=balances, with_engine=not skip_engine))


@bench.command(name="http")
@click.option(
    "--duration",
    default=10,
    show_default=True,
    type=click.IntRange(1, 20),
    help="Seconds of load per phase (the pre-signed pools grow with it).",
)
@click.option(
    "--processes",
    default=[2],
    show_default=True,
    multiple=True,
    type=click.IntRange(1, 16),
    help="Run the ingress as `tally ingress --processes N` (2: SO_REUSEPORT, the faster "
    "on 2 cores); repeat to compare (--processes 1 --processes 2).",
)
@click.option(
    "--connections",
    default=64,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="wrk connections for the single-command phase.",
)
@click.option(
    "--batch-connections",
    default=4,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="wrk connections for the batch phase.",
)
@click.option(
    "--batch-size",
    default=1000,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Commands per batch request.",
)
@click.option(
    "--threads", default=1, show_default=True, type=click.IntRange(1, 64), help="wrk threads."
)
@click.option(
    "--report",
    default="reports/bench-http.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
)
def bench_http(
    duration: int,
    processes: tuple[int, ...],
    connections: int,
    batch_connections: int,
    batch_size: int,
    threads: int,
    report: Path,
) -> None:
    """Signed commands through a real `tally ingress`, load from wrk on loopback.

    Two phases of DURATION seconds each: single-command POST /v1/commands
    (requests/s answered 202, p50/p99 latency) and POST /v1/commands/batch with
    BATCH-SIZE commands per request (commands/s). Every request is signed
    (HMAC-SHA256, pre-signed before the phase: wrk's Lua has no HMAC), with a nonce and
    a signature of its own (the ingress accepts a signature once), and every command_id
    is used once. The ingress runs on topics of its own with the rate limit
    raised out of the way; no engine runs, so a 202 is the broker's acks=all
    acknowledgement. Needs wrk (installed by `make services`); the topics and schema are
    deleted afterwards.
    """
    from bench import ingress as job

    settings = read_settings()
    setup_logging(settings, "bench http", quiet=True)
    asyncio.run(
        job.run(
            settings,
            processes=list(processes),
            duration_s=duration,
            connections=connections,
            batch_connections=batch_connections,
            batch_size=batch_size,
            threads=threads,
            report=report,
        )
    )


COMMANDS = (demo, roundtrip_check, chaos, bench)
