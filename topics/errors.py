"""The root of the topics family's errors: a deployment's topics are not what it needs."""

from __future__ import annotations

from core.errors import CANNOT_RUN, TallyError


class TopicError(TallyError):
    """An existing topic does not fit the deployment, or the broker refused to fix it."""

    exit_code = CANNOT_RUN
