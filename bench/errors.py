"""The root of the bench family's errors: a benchmark that could not measure."""

from __future__ import annotations

from core.errors import FAILED, TallyError


class BenchError(TallyError):
    """The benchmark could not measure (a tool missing, a phase that did not finish, a
    store that lost events): not a slow result, a run with no result."""

    exit_code = FAILED
