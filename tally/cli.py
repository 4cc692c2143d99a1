"""The `tally` command: one entry point, settings read and checked here and passed down."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

import click

from core.settings import Settings, SettingsError, load
from tally import roundtrip


def _settings() -> Settings:
    try:
        return load(os.environ)
    except SettingsError as exc:
        click.echo(f"tally: {exc}", err=True)
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
    from core.logs import setup_logging

    setup_logging(settings, "demo", quiet=True)
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
@click.option("--web-port", type=int, hidden=True, help="Internal: one such process's port.")
def sink(target: str, processes: int, partitions: str | None, web_port: int | None) -> None:
    """Run one sink: project the events topic into PostgreSQL or Redis.

    Consumes <prefix>.events in batches (TALLY_SINK_BATCH_SIZE events or
    TALLY_SINK_LINGER_MS), writes each idempotently, then commits. With --processes 1
    (the default) it is a member of the consumer group <prefix>-sink-TARGET, so several
    hosts can share the partitions; with --processes N it splits them over N processes
    here instead: do not mix the two for one target. The PostgreSQL sink migrates its
    schema first. Each process serves /livez, /readyz and /metrics on
    TALLY_SINK_POSTGRES_WEB_PORT or TALLY_SINK_REDIS_WEB_PORT (with --processes N,
    process k on that port + 1 + k). Stop with SIGTERM.
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
    sys.exit(
        service.run(settings, target, processes=processes, partitions=shares, web_port=web_port)
    )


@main.command()
def notify() -> None:
    """Push result events to the subscribers' HTTP endpoints (see /v1/subscriptions).

    A member of the consumer group <prefix>-notify on <prefix>.events (run several to
    share the partitions). Each delivery is a signed POST, retried with backoff until a
    2xx or TALLY_NOTIFY_RETRY_HORIZON_S, then parked as failed. /livez, /readyz and
    /metrics on TALLY_WEB_HOST:TALLY_NOTIFY_PORT. Stop with SIGTERM.
    """
    from notify import service

    sys.exit(service.run(_settings()))


@main.command()
def migrate() -> None:
    """Apply pending SQL migrations to the deployment's PostgreSQL schema.

    The schema is named after TALLY_TOPIC_PREFIX; files come from migrations/ in order,
    each in its own transaction. Safe to run twice or concurrently (advisory lock).
    On a deployment from before 128-bit amounts, 0002 turns the bigint money columns
    into numeric, rewriting those tables: stop the PostgreSQL sink while it runs.
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
    with a key from TALLY_INGRESS_KEYS ("id:secret,..."), and each signature is accepted
    once (remembered in Redis, shared by every process); TALLY_INGRESS_INSECURE=1 turns
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
@click.option(
    "--idempotency-key",
    default=None,
    help="Send this Idempotency-Key (it is signed, so it is printed with the rest).",
)
@click.option(
    "--content-type",
    default=None,
    help="The Content-Type to sign and print [default: application/json with a BODY, "
    "none without].",
)
def sign(
    method: str, target: str, body: str, key_id: str, idempotency_key: str | None,
    content_type: str | None,
) -> None:  # fmt: skip
    """Print the headers of one signed request, one per line, for curl -H @file.

    The secret is read from TALLY_CLIENT_SECRET (never an argument: arguments show in
    `ps`). TARGET is the path and query exactly as sent; BODY the exact body bytes. The
    signature covers the Content-Type and Idempotency-Key, so those are printed too, and
    it is accepted once: sign every request anew (each run has a new nonce).

    \b
      body='{"kind":"deposit","command_id":"d1","account":"alice","asset":"USD","amount":5}'
      curl -H @<(tally sign POST /v1/commands "$body") -d "$body" \\
           http://127.0.0.1:8080/v1/commands
    """
    from ingress import signing

    secret = os.environ.get("TALLY_CLIENT_SECRET")
    if not secret:
        click.echo("tally sign: set TALLY_CLIENT_SECRET to the client's secret", err=True)
        sys.exit(2)
    if content_type is None and body:
        content_type = "application/json"
    headers = {}
    if content_type is not None:
        headers[signing.CONTENT_TYPE] = content_type
    if idempotency_key is not None:
        headers[signing.IDEMPOTENCY_KEY] = idempotency_key
    try:
        headers.update(
            signing.sign(
                key_id, secret.encode(), method, target, body.encode(),
                idempotency_key=idempotency_key, content_type=content_type,
            )
        )  # fmt: skip
    except ValueError as exc:
        click.echo(f"tally sign: {exc}", err=True)
        sys.exit(2)
    for name, value in headers.items():
        click.echo(f"{name}: {value}")


@main.command()
@click.option(
    "--target",
    required=True,
    type=click.Choice(["postgres", "redis"]),
    help="The store to rebuild: the PostgreSQL schema or the Redis keys of this deployment.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replay even while a live sink of the target is a member of its consumer group.",
)
def replay(target: str, force: bool) -> None:
    """Rebuild a sink store from the events topic, then stop.

    Reads every partition of <prefix>.events from its beginning (offset 0, or the
    earliest retained) up to the end offsets taken at the start, and writes the events
    through the sink's own store code: into an empty store, or over a full one, where
    repeats change nothing (PostgreSQL inserts skip existing rows and balances only move
    forward; Redis keeps the highest seq). Prints events, entries, seconds and events/s.
    Progress goes to stderr: a bar on a terminal, a line every 5 s otherwise.

    It does not touch the live sink's consumer group <prefix>-sink-TARGET (own
    consumer, static assignment, nothing committed). For PostgreSQL, a replay that
    reaches the end raises sink_offsets to at least the end offsets taken at the start
    and never lowers them, so a sink started afterwards resumes there; an interrupted
    replay leaves them as they were.

    Exit status: 0 done; 2 refused or cannot start (a live member in the sink's group,
    without --force; the store or Kafka unreachable; no events topic); 1 interrupted
    (SIGINT, SIGTERM) or failed. Not seen by the group check: a sink run with
    `tally sink --processes N`, which joins no group; stop it first.

    \b
      tally replay --target redis
      tally replay --target postgres --force
    """
    from sinks import replay as job

    sys.exit(
        job.run(
            _settings(),
            target,
            force=force,
            out=click.echo,
            err=lambda line: click.echo(line, err=True),
        )
    )


@main.command()
@click.option(
    "--show",
    default=20,
    show_default=True,
    type=click.IntRange(0, 10_000),
    help="Print the first N mismatches (shard by shard, in key order).",
)
@click.option(
    "--engine-url",
    metavar="URL",
    help="Any engine worker's web server; it forwards each shard to its owner. "
    "[default: http://127.0.0.1:$TALLY_WEB_PORT]",
)
@click.option("--skip-engine", is_flag=True, help="Do not compare the engine's tables.")
@click.option("--skip-redis", is_flag=True, help="Do not compare Redis.")
@click.option(
    "--batch-size",
    default=5000,
    show_default=True,
    type=click.IntRange(100, 10_000),
    help="Balances per PostgreSQL fetch, engine page and Redis call: what bounds memory.",
)
def audit(
    show: int, engine_url: str | None, skip_engine: bool, skip_redis: bool, batch_size: int
) -> None:
    """Recompute every balance from the ledger and compare PostgreSQL, Redis and the
    engine with it.

    \b
    For each balance in PostgreSQL's `ledger_entries` (schema TALLY_TOPIC_PREFIX):
      - the balance = its last breakpoint's *_after + the deltas of the later entries
        (the sum of all entries when it has no breakpoint); its seq = the last entry's;
      - that must equal PostgreSQL `balances`, the Redis hash and the engine's table
        (GET /shards/{shard}/balances on a worker), balance by balance;
      - its entries' seqs must be 1..n without gaps, and a breakpoint must agree with
        the sum of all entries;
      - per asset, the balances must add up to deposits - withdrawals - captures to no
        account (transfers, disbursements, credits and refunds net to zero).

    Shard by shard, in pages (bounded memory whatever the number of balances). Audit a
    deployment whose sinks have drained: changes still in flight show as mismatches.
    Prints a summary, then the first --show mismatches with account, asset, seq and
    the values that differ.

    Exit status: 0 everything agrees, 1 a mismatch was found, 2 bad usage or a store
    (PostgreSQL, Redis, engine) unreachable.
    """
    from tally import audit as audit_job

    settings = _settings()
    if skip_engine and engine_url is not None:
        raise click.UsageError("--engine-url and --skip-engine do not go together")
    url = None if skip_engine else engine_url or f"http://127.0.0.1:{settings.web_port}"
    try:
        report = asyncio.run(
            audit_job.Audit(
                settings,
                engine_url=url,
                with_redis=not skip_redis,
                show=show,
                batch_size=batch_size,
            ).run()
        )
    except audit_job.AuditError as exc:
        hint = {"engine": " (--skip-engine audits without it)",
                "Redis": " (--skip-redis audits without it)"}.get(exc.store, "")  # fmt: skip
        click.echo(f"tally audit: {exc}{hint}", err=True)
        sys.exit(2)
    click.echo(audit_job.render(report))
    sys.exit(0 if report.ok else 1)


@main.command(name="import")
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option(
    "--pg-query",
    metavar="SQL",
    help="Read the rows from this query instead of a file; it must return the columns "
    "account, asset, amount. Read in batches through a server-side cursor, in one "
    "read-only snapshot.",
)
@click.option(
    "--pg-dsn",
    metavar="DSN",
    help="The database of --pg-query [default: TALLY_PG_DSN]. A password in an argument "
    "shows in `ps`: prefer TALLY_PG_DSN or ~/.pgpass.",
)
@click.option("--strict", is_flag=True, help="Produce nothing if any row is bad.")
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait for the engine's result of every deposit and report them; --no-wait "
    "only produces and reports what Kafka acknowledged.",
)
@click.option("--dry-run", is_flag=True, help="Only check the rows and report; produce nothing.")
@click.option(
    "--timeout",
    "timeout_s",
    default=60,
    show_default=True,
    type=click.IntRange(1, 3600),
    help="Give up after this many seconds without a new result (or acknowledgement) "
    "from the engine (Kafka).",
)
def import_(
    file: Path | None,
    pg_query: str | None,
    pg_dsn: str | None,
    strict: bool,
    wait: bool,
    dry_run: bool,
    timeout_s: int,
) -> None:
    """Import opening balances as idempotent deposits.

    One deposit per row, with an id derived from the row's account and asset, so that
    running the same import again applies nothing twice.

    The rows come from FILE, a CSV file with the header account,asset,amount (amounts
    are integers in the asset's minor unit), or from --pg-query. Every row is checked
    before anything is produced; each bad row is reported with its line (or row)
    number and reason: a bad account id or asset, an amount that is not an integer,
    has decimals, is not positive or exceeds 2^127-1, a missing or extra field, or an
    (account, asset) pair on more than one row (all of its rows are refused). Without
    --strict the good rows are imported anyway.

    Each deposit's command_id is open:<account>:<asset>. A second run answers every row
    `duplicate` (already imported); a row whose amount changed since it was imported
    comes back `rejected: command_id_reused` and the ledger keeps the first amount. The
    engine remembers ids for TALLY_IDEMPOTENCY_RETENTION_S (7 days by default): a run
    later than that applies them again.

    Deposits go to <TALLY_TOPIC_PREFIX>.commands, keyed by account; an engine must be
    running for the results. The summary counts applied, already imported and rejected
    (by reason) deposits and lists the rows not imported.

    Exit status: 0 every row is in the ledger (with --no-wait: produced; with
    --dry-run: good); 1 not every row was imported (bad rows, rejections, no result in
    time); 2 the import could not run (usage, missing file, Kafka or PostgreSQL
    unreachable, failing query).

    \b
      tally import balances.csv
      tally import --strict --dry-run balances.csv
      tally import --pg-query "SELECT account, asset, amount FROM legacy.balances"
    """
    from tally import importer

    settings = _settings()
    if (file is None) == (pg_query is None):
        raise click.UsageError("give either FILE or --pg-query")
    if pg_dsn is not None and pg_query is None:
        raise click.UsageError("--pg-dsn goes with --pg-query")
    source: importer.Source
    if pg_query is not None:
        source = importer.PgSource.of(settings, pg_query, dsn=pg_dsn)
    else:
        assert file is not None  # one of the two, checked above
        source = importer.CsvSource(file)
    options = importer.Options(
        strict=strict, wait=wait, dry_run=dry_run, stall_timeout_s=float(timeout_s)
    )
    logging.basicConfig(level=logging.WARNING)
    # Its connection errors would repeat the one line this command prints.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        report = asyncio.run(
            importer.run(settings, source, options, say=lambda line: click.echo(line, err=True))
        )
    except importer.ImportFailed as exc:
        click.echo(f"tally import: {exc}", err=True)
        sys.exit(2)
    click.echo(importer.render(report))
    sys.exit(report.exit_code())


@main.command()
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
    default=",".join(
        ("kill9", "sigstop", "add_worker", "broker_restart", "pg_restart", "redis_flush")
    ),
    show_default=True,
    help="Comma-separated fault kinds to draw from; each comes once before any repeats.",
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
    help="The Redis database of the run, which it FLUSHes (at the start and as a fault).",
)
@click.option("--keep", is_flag=True, help="Keep the run's topics, schema and Redis keys.")
def chaos(
    duration_s: int,
    seed: int,
    faults_count: int | None,
    kinds: str,
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
    the newest leaves with SIGTERM instead), broker_restart, pg_restart, redis_flush.
    Then it waits for everything to drain and checks: one
    result per command record, one decision per (account, command id), one result per internal
    command, seq 1..n per balance, conservation per asset, dead letters = the garbage
    sent, the stores hold the events' balances, and `tally audit`.

    Needs the services of `make services` (it restarts the broker and PostgreSQL those
    scripts run). Logs: .cache/chaos/<prefix>/. Exit status: 0 every check passed,
    1 a check failed (the seed and plan are printed to reproduce it), 2 the run could
    not be carried out.
    """
    from tally import chaos as chaos_job

    settings = _settings()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    # The harness breaks the broker on purpose: aiokafka's reconnect chatter is expected.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    picked = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = sorted(set(picked) - set(chaos_job.KINDS))
    if unknown or not picked:
        raise click.BadParameter(
            f"unknown {unknown}; choose from {', '.join(chaos_job.KINDS)}", param_hint="--kinds"
        )
    count = faults_count if faults_count is not None else max(3, duration_s // 25)
    harness = chaos_job.Harness(
        settings,
        seed=seed,
        duration_s=duration_s,
        faults_count=count,
        kinds=picked,
        workers=workers,
        rate=rate,
        accounts=accounts,
        redis_db=redis_db,
        work_dir=Path(".cache/chaos").resolve(),
        say=lambda line: click.echo(line, err=True),
    )
    click.echo("fault plan:", err=True)
    for fault in harness.run.plan:
        click.echo(f"  {fault.line()}", err=True)

    async def go() -> chaos_job.Run:
        try:
            return await harness.execute()
        finally:
            if not keep:
                await harness.clean()

    try:
        run = asyncio.run(go())
    except (chaos_job.ChaosError, faults_unavailable()) as exc:
        click.echo(f"tally chaos: could not run (seed {seed}): {exc}", err=True)
        click.echo(chaos_job.render(harness.run), err=True)
        sys.exit(2)
    click.echo(chaos_job.render(run))
    sys.exit(0 if run.ok else 1)


def faults_unavailable() -> type[Exception]:
    from tally.faults import FaultUnavailable

    return FaultUnavailable


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
    from tally import bench as bench_job

    settings = _settings()
    logging.basicConfig(level=logging.WARNING)
    guarantees = ["exactly_once", "at_least_once"] if guarantee == "both" else [guarantee]
    asyncio.run(
        bench_job.run(settings, count=count, guarantees=guarantees, report=report, workers=workers)
    )


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
    from tally import bench_notify as job

    settings = _settings()
    logging.basicConfig(level=logging.WARNING)
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
    from sinks.replay import ReplayError
    from tally import bench_replay as job

    settings = _settings()
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(job.run(settings, count=events, report=report))
    except (job.BenchError, ReplayError) as exc:
        click.echo(f"tally bench replay: {exc}", err=True)
        sys.exit(1)


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
    from tally import bench_recovery as job

    sys.exit(job.main(_settings(), balances=balances, partitions=partitions, report=report))


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
    from tally import bench_audit as job

    logging.basicConfig(level=logging.WARNING)
    sys.exit(job.main(_settings(), balances=balances, with_engine=not skip_engine))


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
