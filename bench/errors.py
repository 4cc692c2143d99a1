"""The root of the bench family's errors: a benchmark that could not measure."""

from __future__ import annotations

from core.errors import FAILED, TallyError


class BenchError(TallyError):
    """The benchmark could not run or measure (wrk missing, the ingress refused the
    warm-up, a replay did not finish or lost events)."""

    exit_code = FAILED
