"""`tally` commands for the operator of a deployment: its settings, a signed request,
rebuilding a sink store, the audit, and importing opening balances."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from tally.common import BadInput, Command, read_settings, status


@click.command(cls=Command)
def config() -> None:
    """Validate the TALLY_* settings and print them (passwords masked) as JSON."""
    click.echo(json.dumps(read_settings().redacted(), indent=2))


@click.command(cls=Command)
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
        raise BadInput("set TALLY_CLIENT_SECRET to the client's secret")
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
        raise BadInput(str(exc)) from exc
    for name, value in headers.items():
        click.echo(f"{name}: {value}")


@click.command(cls=Command)
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
    from replay import run as job

    sys.exit(
        job.run(
            read_settings(),
            target,
            force=force,
            out=click.echo,
        )
    )


@click.command(cls=Command)
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
    from audit import job
    from audit.run import AuditError, render

    settings = read_settings()
    if skip_engine and engine_url is not None:
        raise click.UsageError("--engine-url and --skip-engine do not go together")
    url = job.engine_url(settings, engine_url, skip_engine=skip_engine)
    try:
        report = job.run(
            settings, engine_url=url, with_redis=not skip_redis, show=show, batch_size=batch_size
        )
    except AuditError as exc:
        if exc.store in WORKAROUNDS:
            exc.add_note(WORKAROUNDS[exc.store])
        raise
    click.echo(render(report))
    sys.exit(status(report.ok))


# The option that audits without a store the audit could not reach.
WORKAROUNDS = {
    "engine": "(--skip-engine audits without it)",
    "Redis": "(--skip-redis audits without it)",
}


@click.command(cls=Command, name="import")
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
    from importer import job
    from importer.run import Options, render

    settings = read_settings()
    if (file is None) == (pg_query is None):
        raise click.UsageError("give either FILE or --pg-query")
    if pg_dsn is not None and pg_query is None:
        raise click.UsageError("--pg-dsn goes with --pg-query")
    source = job.source_of(settings, file, pg_query, pg_dsn)
    options = Options(strict=strict, wait=wait, dry_run=dry_run, stall_timeout_s=float(timeout_s))
    report = job.run(settings, source, options, say=lambda line: click.echo(line, err=True))
    click.echo(render(report))
    sys.exit(report.exit_code())


COMMANDS = (config, sign, replay, audit, import_)
