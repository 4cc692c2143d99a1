"""`tally` commands that run the product: an engine worker, a sink, the notifier, the
HTTP ingress, and the migrations the sinks and the ingress read through."""

from __future__ import annotations

import asyncio
import sys

import click

from tally.common import Command, read_settings


@click.command(cls=Command)
def engine() -> None:
    """Run one engine worker: apply commands from Kafka against RocksDB tables.

    Workers with the same TALLY_TOPIC_PREFIX share the shards (one Kafka consumer
    group). Stop with SIGTERM or Ctrl-C. A worker that was killed loses nothing: its
    next start catches its RocksDB up from the changelog topic.
    """
    from streams import worker

    sys.exit(worker.run(read_settings()))


@click.command(cls=Command)
@click.argument("target", type=click.Choice(["postgres", "redis"]))
@click.option(
    "--processes",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Spread the partitions over this many processes on this host (fixed shares, "
    "no rebalancing between them; a process that dies is restarted).",
)
def sink(target: str, processes: int) -> None:
    """Run one sink: project the events topic into PostgreSQL or Redis.

    Consumes <prefix>.events in batches (TALLY_SINK_BATCH_SIZE events or
    TALLY_SINK_LINGER_MS), writes each idempotently, then commits. With --processes 1
    (the default) it is a member of the consumer group <prefix>-sink-TARGET, so several
    hosts can share the partitions; with --processes N it splits them over N processes
    here instead: do not mix the two for one target. The PostgreSQL sink migrates its
    schema first. Each process serves /livez, /readyz and /metrics on
    TALLY_SINK_POSTGRES_WEB_PORT or TALLY_SINK_REDIS_WEB_PORT (with --processes N,
    process k, started as `python -m sinks`, on that port + 1 + k). Stop with SIGTERM.
    """
    from sinks import service

    sys.exit(service.run(read_settings(), target, processes=processes))


@click.command(cls=Command)
def notify() -> None:
    """Push result events to the subscribers' HTTP endpoints (see /v1/subscriptions).

    A member of the consumer group <prefix>-notify on <prefix>.events (run several to
    share the partitions). Each delivery is a signed POST, retried with backoff until a
    2xx or TALLY_NOTIFY_RETRY_HORIZON_S, then parked as failed. /livez, /readyz and
    /metrics on TALLY_WEB_HOST:TALLY_NOTIFY_PORT. Stop with SIGTERM.
    """
    from notify import service

    sys.exit(service.run(read_settings()))


@click.command(cls=Command)
def migrate() -> None:
    """Apply pending SQL migrations to the deployment's PostgreSQL schema.

    The schema is named after TALLY_TOPIC_PREFIX; files come from migrations/ in order,
    each in its own transaction. Safe to run twice or concurrently (advisory lock).
    On a deployment from before 128-bit amounts, 0002 turns the bigint money columns
    into numeric, rewriting those tables: stop the PostgreSQL sink while it runs.
    """
    from sinks import migrate as job

    settings = read_settings()
    applied = asyncio.run(job.migrate_deployment(settings, say=click.echo))
    if not applied:
        click.echo(f"schema {settings.topic_prefix}: up to date")


@click.command(cls=Command)
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

    sys.exit(service.run(read_settings(), processes=processes))


COMMANDS = (engine, sink, notify, migrate, ingress)
