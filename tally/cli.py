"""The `tally` command: one entry point, settings read and checked here and passed down."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
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
@click.option("--count", default=5000, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--accounts", default=500, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--seed", default=7, show_default=True, type=int)
def demo(count: int, accounts: int, seed: int) -> None:
    """Round trip COUNT deposits through Kafka, PostgreSQL and Redis and check the totals."""
    settings = _settings()
    logging.basicConfig(level=settings.log_level)
    try:
        report = asyncio.run(roundtrip.run(settings, count=count, accounts=accounts, seed=seed))
    except roundtrip.RoundTripError as exc:
        click.echo(f"tally demo: FAILED: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"tally demo: a service is unreachable ({exc}); run `make services`", err=True)
        sys.exit(1)
    click.echo(roundtrip.render(report))


@main.command()
def engine() -> None:
    """Run the balance engine worker (Faust agents over the commands topic)."""
    _not_yet("engine", 3)


@main.command()
@click.argument("target", type=click.Choice(["postgres", "redis"]))
def sink(target: str) -> None:
    """Run one sink: project the events topic into PostgreSQL or Redis."""
    _not_yet(f"sink {target}", 4)


@main.command()
def migrate() -> None:
    """Apply pending SQL migrations to PostgreSQL."""
    _not_yet("migrate", 4)


@main.command()
def ingress() -> None:
    """Run the HTTP ingress alone."""
    _not_yet("ingress", 5)


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


@main.command()
def bench() -> None:
    """Run the benchmarks and print their numbers."""
    _not_yet("bench", 3)
