"""One sink process with a fixed share of the partitions: what `tally sink TARGET
--processes N` starts N of (see `sinks.service.child_commands`). Runnable by hand too:

    python -m sinks postgres --partitions 0,2 --web-port 9101
"""

from __future__ import annotations

import os
import sys

import click

from core.cli import Command
from core.settings import load
from sinks import service


def _shares(raw: str, partitions: int) -> list[int]:
    try:
        shares = sorted({int(p) for p in raw.split(",")})
    except ValueError:
        raise click.BadParameter("a comma-separated list of partition numbers") from None
    if not shares or shares[0] < 0 or shares[-1] >= partitions:
        raise click.BadParameter(f"partitions must be within 0..{partitions - 1}")
    return shares


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", type=click.Choice(list(service.TARGETS)))
@click.option(
    "--partitions",
    required=True,
    help="The partitions of the events topic this process owns, e.g. 0,2,4 (no consumer "
    "group: the share is fixed).",
)
@click.option(
    "--web-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="This process's /livez, /readyz and /metrics port (0: none) instead of the "
    "target's TALLY_SINK_*_WEB_PORT.",
)
def main(target: str, partitions: str, web_port: int | None) -> None:
    """Project the events of PARTITIONS into TARGET (postgres or redis)."""
    settings = load(os.environ)  # a SettingsError ends it (core.cli.Command)
    shares = _shares(partitions, settings.partitions)
    sys.exit(service.run(settings, target, partitions=shares, web_port=web_port))


if __name__ == "__main__":
    main(prog_name="python -m sinks")
