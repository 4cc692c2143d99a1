"""The one place where an error of Tally's becomes a line and an exit status, for every
program: the `tally` CLI (tally/common.py) and the packages' own entry points
(`python -m sinks`, `python -m ingress`).

A command raises its family's error (`core.errors.TallyError`); `Command.invoke` prints
it as `PROGRAM COMMAND: message` on stderr and exits with the family's status. Any other
exception is a bug and keeps its traceback."""

from __future__ import annotations

from typing import Any, ClassVar

import click

from core.errors import TallyError, exit_status, message


def name_of(ctx: click.Context, program: str | None = None) -> str:
    """The program and the subcommands invoked ("tally bench replay"); `program` names
    the program whatever it was started as, else the name it was given (`prog_name`)."""
    names: list[str] = []
    while ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join([program or ctx.info_name or "", *reversed(names)])


class Command(click.Command):
    """A command that a TallyError ends with one line and its family's status."""

    program: ClassVar[str | None] = None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TallyError as error:
            click.echo(f"{name_of(ctx, self.program)}: {message(error)}", err=True)
            ctx.exit(exit_status(error))
