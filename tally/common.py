"""What every `tally` command shares: the settings, read from the environment once and
checked, and the `tally` flavour of `core.cli.Command`, the one place where an error of
Tally's becomes a line (`tally COMMAND: message`) and an exit status (see core/errors.py
for the table).
"""

from __future__ import annotations

import os

import click

from core import cli as core_cli
from core.errors import CANNOT_RUN, FAILED, TallyError
from core.settings import Settings, load

CONTEXT = {"help_option_names": ["-h", "--help"]}


def read_settings() -> Settings:
    """The TALLY_* settings; a SettingsError (exit status 2) names the bad variable."""
    return load(os.environ)


def status(ok: bool) -> int:
    """The exit status of a command whose result is a verdict: 0 when it holds."""
    return 0 if ok else FAILED


class BadInput(TallyError):
    """The tally family's root: an argument or variable a command cannot use (the
    message says which); like a usage error, exit status 2."""

    exit_code = CANNOT_RUN


class Command(core_cli.Command):
    """A `tally` subcommand: named `tally ...` whatever the program was started as
    (`python -m tally.cli` too)."""

    program = "tally"


class Group(click.Group):
    """A group of `tally` subcommands (the commands it makes are `Command`s)."""

    command_class = Command
    group_class = type  # a group in the group is one of these too
