"""The root of the sinks family's errors: a store that cannot be brought up."""

from __future__ import annotations

from core.errors import FAILED, TallyError


class SinkError(TallyError):
    """A sink's store is not in a state the sink can work from (its migrations)."""

    exit_code = FAILED
