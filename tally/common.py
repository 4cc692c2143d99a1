"""What every `tally` command shares: the settings, read from the environment once and
checked, and the one place where an error of Tally's becomes a line and an exit status.

A command raises its family's error (`core.errors.TallyError`); `Command.invoke` prints
it as `tally COMMAND: message` on stderr and exits with the family's status (see
core/errors.py for the table). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from typing import Any

import click

from core.errors import CANNOT_RUN, FAILED, TallyError, exit_status, message
from core.settings import Settings, load

CONTEXT = {"help_option_names": ["-h", "--help"]}


def read_settings() -> Settings:
    """The TALLY_* settings; a SettingsError (exit status 2) names the bad variable."""
    return load(os.environ)


def status(ok: bool) -> int:
    """The exit status of a command whose result is a verdict: 0 when it holds."""
    return 0 if ok else FAILED


def name_of(ctx: click.Context) -> str:
    """`tally` and the subcommands invoked ("tally bench replay"), whatever the program
    was started as (`python -m tally.cli` too)."""
    names: list[str] = []
    while ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["tally", *reversed(names)])


class BadInput(TallyError):
    """The tally family's root: an argument or variable a command cannot use (the
    message says which); like a usage error, exit status 2."""

    exit_code = CANNOT_RUN


class Command(click.Command):
    """A `tally` subcommand: a TallyError ends it with one line and its status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TallyError as error:
            click.echo(f"{name_of(ctx)}: {message(error)}", err=True)
            ctx.exit(exit_status(error))


class Group(click.Group):
    """A group of `tally` subcommands (the commands it makes are `Command`s)."""

    command_class = Command
    group_class = type  # a group in the group is one of these too
