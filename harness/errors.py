"""The root of the harness family's errors: a job that cannot be carried out."""

from __future__ import annotations

from core.errors import CANNOT_RUN, TallyError


class HarnessError(TallyError):
    """A harness job (chaos, a child process, a fault) could not be carried out: a broken
    setup, not a finding. A finding is a failed check in the job's report."""

    exit_code = CANNOT_RUN
