"""One ingress process: what `tally ingress --processes N` starts N of on the same port
(SO_REUSEPORT). Runnable by hand too: `python -m ingress`."""

from __future__ import annotations

import os
import sys

import click

from core.errors import exit_status, message
from core.settings import SettingsError, load
from ingress import service


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Serve the HTTP ingress on TALLY_INGRESS_HOST:TALLY_INGRESS_PORT (see `tally ingress
    --help`)."""
    try:
        settings = load(os.environ)
    except SettingsError as exc:
        click.echo(f"python -m ingress: {message(exc)}", err=True)
        sys.exit(exit_status(exc))
    sys.exit(service.run(settings))


if __name__ == "__main__":
    main(prog_name="python -m ingress")
