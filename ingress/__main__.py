"""One ingress process: what `tally ingress --processes N` starts N of on the same port
(SO_REUSEPORT). Runnable by hand too: `python -m ingress`."""

from __future__ import annotations

import os
import sys

import click

from core.cli import Command
from core.settings import load
from ingress import service


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Serve the HTTP ingress on TALLY_INGRESS_HOST:TALLY_INGRESS_PORT (see `tally ingress
    --help`)."""
    settings = load(os.environ)  # a SettingsError ends it (core.cli.Command)
    sys.exit(service.run(settings))


if __name__ == "__main__":
    main(prog_name="python -m ingress")
