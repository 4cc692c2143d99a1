"""The root of the errors a Tally command reports to its operator, and what each means
for the exit status.

Every package family has one root that derives from `TallyError` and says which exit
status its errors end a command with; a family's errors derive from its root. Every
program catches `TallyError` in one place (`core.cli.Command`: the `tally` CLI and the
`python -m sinks` / `python -m ingress` entry points), prints `PROGRAM COMMAND: message`
as one line and exits with `exit_status(error)`. Expected outcomes (a rejected
command, a mismatch an audit finds) are results, not errors; a bug is neither and
keeps its traceback.

The families and their statuses (the "Exit status" paragraphs of the commands' --help):

    core.settings.SettingsError    2  a setting is missing, malformed or out of range
    topics.errors.TopicError       2  the deployment's topics are not what it needs
    sinks.errors.SinkError         1  a sink's store cannot be brought up (migrations)
    audit.rows.AuditError          2  the audit cannot run (a store unreachable)
    importer.rows.ImportFailed     2  the import cannot run (a source or service down)
    replay.checks.ReplayError      2  the replay must not or cannot start
    harness.errors.HarnessError    2  a harness job cannot be carried out (chaos)
      harness.roundtrip.RoundTripError  1  the round trip ran and found a difference
    bench.errors.BenchError        1  a benchmark could not measure
    tally.common.BadInput          2  an argument a command cannot use (`tally sign`)
"""

from __future__ import annotations

from typing import ClassVar

# A command that ran and failed (a check that did not hold, a job that broke).
FAILED = 1
# A command that could not run or refused to (usage, settings, a service unreachable).
CANNOT_RUN = 2


class TallyError(Exception):
    """An error a command reports in one line, ending with the status of its family.

    The message is written for the operator: one line, naming what failed."""

    exit_code: ClassVar[int] = FAILED


def exit_status(error: TallyError) -> int:
    """The exit status a command ends with on `error`: its family's."""
    return error.exit_code


def message(error: TallyError) -> str:
    """What the operator reads after the command's name: the error's message (its
    type's name when it has none), then any notes added on the way up, such as the
    option that works around it."""
    text = str(error).strip() or type(error).__name__
    return " ".join([text, *getattr(error, "__notes__", ())])
