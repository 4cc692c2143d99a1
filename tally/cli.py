"""The `tally` command: one entry point, settings read and checked here and passed down."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import click

from tally import roundtrip
from tally.settings import Settings, SettingsError, load


def _settings() -> Settings:
    try:
        return load(os.environ)
    except SettingsError as exc:
        click.echo(f"tally: {exc}", err=True)
        sys.exit(2)


def _not_yet(what: str, issue: int) -> NoReturn:
    """Subcommands whose issue has not landed say so plainly and fail."""
    click.echo(f"tally {what}: not implemented yet (tracked in issue #{issue})", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Tally, a balance engine on Kafka.

    Settings come from TALLY_* environment variables; `tally config` shows them.
    """


@main.command()
def config() -> None:
    """Validate the TALLY_* settings and print them (passwords masked) as JSON."""
    click.echo(json.dumps(_settings().redacted(), indent=2))


@main.command()
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
    settings = _settings()
    logging.basicConfig(level=logging.WARNING)
    if stack_check:
        _roundtrip(settings, count=2000, accounts=100, seed=seed)
        click.echo("")
    from tally import demo as demo_job

    ok = demo_job.run(settings, count=count, accounts=accounts, seed=seed, keep=keep)
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--count", default=5000, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--accounts", default=500, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--seed", default=7, show_default=True, type=int)
def roundtrip_check(count: int, accounts: int, seed: int) -> None:
    """Round trip COUNT deposits through Kafka, PostgreSQL and Redis and check the totals."""
    _roundtrip(_settings(), count=count, accounts=accounts, seed=seed)


def _roundtrip(settings: Settings, *, count: int, accounts: int, seed: int) -> None:
    try:
        report = asyncio.run(roundtrip.run(settings, count=count, accounts=accounts, seed=seed))
    except roundtrip.RoundTripError as exc:
        click.echo(f"tally: round trip FAILED: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"tally: a service is unreachable ({exc}); run `make services`", err=True)
        sys.exit(1)
    click.echo(roundtrip.render(report))


@main.command()
def engine() -> None:
    """Run one engine worker: apply commands from Kafka against RocksDB tables.

    Workers with the same TALLY_TOPIC_PREFIX share the shards (one Kafka consumer
    group). Stop with SIGTERM or Ctrl-C. A worker that was killed loses nothing: its
    next start catches its RocksDB up from the changelog topic.
    """
    from streams import worker

    sys.exit(worker.run(_settings()))


@main.command()
@click.argument("target", type=click.Choice(["postgres", "redis"]))
@click.option(
    "--processes",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Spread the partitions over this many processes on this host (fixed shares, "
    "no rebalancing between them; a process that dies is restarted).",
)
@click.option("--partitions", hidden=True, help="Internal: the share of one such process.")
def sink(target: str, processes: int, partitions: str | None) -> None:
    """Run one sink: project the events topic into PostgreSQL or Redis.

    Consumes <prefix>.events in batches (TALLY_SINK_BATCH_SIZE events or
    TALLY_SINK_LINGER_MS), writes each idempotently, then commits. With --processes 1
    (the default) it is a member of the consumer group <prefix>-sink-TARGET, so several
    hosts can share the partitions; with --processes N it splits them over N processes
    here instead: do not mix the two for one target. The PostgreSQL sink migrates its
    schema first. Stop with SIGTERM.
    """
    from sinks import service

    settings = _settings()
    shares = None
    if partitions is not None:
        try:
            shares = sorted({int(p) for p in partitions.split(",")})
        except ValueError:
            raise click.BadParameter("a comma-separated list of partition numbers") from None
        if not shares or shares[0] < 0 or shares[-1] >= settings.partitions:
            raise click.BadParameter(f"partitions must be within 0..{settings.partitions - 1}")
    sys.exit(service.run(settings, target, processes=processes, partitions=shares))


@main.command()
def migrate() -> None:
    """Apply pending SQL migrations to the deployment's PostgreSQL schema.

    The schema is named after TALLY_TOPIC_PREFIX; files come from migrations/ in order,
    each in its own transaction. Safe to run twice or concurrently (advisory lock).
    """
    from sinks.migrate import MigrationError
    from sinks.migrate import migrate as run_migrations

    settings = _settings()
    try:
        applied = asyncio.run(
            run_migrations(
                settings.pg_dsn, settings.topic_prefix, settings.partitions, say=click.echo
            )
        )
    except MigrationError as exc:
        click.echo(f"tally migrate: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"tally migrate: PostgreSQL unreachable ({exc})", err=True)
        sys.exit(1)
    if not applied:
        click.echo(f"schema {settings.topic_prefix}: up to date")


@main.command()
@click.option(
    "--processes",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Run this many ingress processes on the same port (SO_REUSEPORT); the kernel "
    "spreads connections over them. A process that dies is restarted.",
)
def ingress(processes: int) -> None:
    """Run the HTTP ingress: signed commands in, balances and results out.

    Listens on TALLY_INGRESS_HOST:TALLY_INGRESS_PORT. Requests under /v1 must be signed
    with a key from TALLY_INGRESS_KEYS ("id:secret,..."); TALLY_INGRESS_INSECURE=1 turns
    that off (warned at start; never in production). Answers 202 once Kafka has the
    command (acks=all), 503 with Retry-After when it cannot. /openapi.json describes the
    API; /livez, /readyz and /metrics are unsigned. Stop with SIGTERM.
    """
    from ingress import service

    sys.exit(service.run(_settings(), processes=processes))


@main.command()
@click.argument("method")
@click.argument("target")
@click.argument("body", required=False, default="")
@click.option(
    "--key-id",
    envvar="TALLY_CLIENT_KEY_ID",
    required=True,
    help="The client key id [env TALLY_CLIENT_KEY_ID].",
)
def sign(method: str, target: str, body: str, key_id: str) -> None:
    """Print the signature headers for one request, one per line, for curl -H @file.

    The secret is read from TALLY_CLIENT_SECRET (never an argument: arguments show in
    `ps`). TARGET is the path and query exactly as sent; BODY the exact body bytes.

    \b
      body='{"kind":"deposit","command_id":"d1","account":"alice","asset":"USD","amount":5}'
      curl -H @<(tally sign POST /v1/commands "$body") -H 'Content-Type: application/json' \\
           -d "$body" http://127.0.0.1:8080/v1/commands
    """
    from ingress import signing

    secret = os.environ.get("TALLY_CLIENT_SECRET")
    if not secret:
        click.echo("tally sign: set TALLY_CLIENT_SECRET to the client's secret", err=True)
        sys.exit(2)
    for name, value in signing.sign(key_id, secret.encode(), method, target, body.encode()).items():
        click.echo(f"{name}: {value}")


@main.command()
def replay() -> None:
    """Rebuild a sink store from the events topic."""
    _not_yet("replay", 6)


@main.command()
def audit() -> None:
    """Recompute balances from the ledger and compare every store."""
    _not_yet("audit", 6)


@main.command(name="import")
def import_() -> None:
    """Import opening balances as idempotent deposits."""
    _not_yet("import", 6)


@main.group()
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
def bench_engine(count: int, guarantee: str, report: Path) -> None:
    """Engine throughput on a backlog of COUNT mixed commands, produce->result latency,
    and the raw aiokafka consume->produce ceiling."""
    from tally import bench as bench_job

    settings = _settings()
    logging.basicConfig(level=logging.WARNING)
    guarantees = ["exactly_once", "at_least_once"] if guarantee == "both" else [guarantee]
    asyncio.run(bench_job.run(settings, count=count, guarantees=guarantees, report=report))


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
    from tally import bench_sinks as job

    settings = _settings()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(job.run(settings, count=events, processes=processes, report=report))


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
    (HMAC-SHA256, pre-signed before the phase: wrk's Lua has no HMAC) and every
    command_id is used once. The ingress runs on topics of its own with the rate limit
    raised out of the way; no engine runs, so a 202 is the broker's acks=all
    acknowledgement. Needs wrk (installed by `make services`); the topics and schema are
    deleted afterwards.
    """
    from tally import bench_http as job

    settings = _settings()
    logging.basicConfig(level=logging.WARNING)
    try:
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
    except job.BenchError as exc:
        click.echo(f"tally bench http: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
