"""`tally audit` in one call: the engine worker to compare with, picked from the options,
then the audit, which returns its report (`audit.run.render` prints it)."""

from __future__ import annotations

import asyncio

from audit.run import Audit, Report
from core.settings import Settings


def engine_url(settings: Settings, given: str | None, *, skip_engine: bool) -> str | None:
    """The engine worker whose web server the audit reads (it forwards each shard to
    its owner): the one given, else the local worker on TALLY_WEB_PORT; None skips it."""
    if skip_engine:
        return None
    return given or f"http://127.0.0.1:{settings.web_port}"


def run(
    settings: Settings,
    *,
    engine_url: str | None,
    with_redis: bool,
    show: int,
    batch_size: int,
) -> Report:
    """Audit the deployment; raises AuditError when a store cannot be read."""
    audit = Audit(
        settings, engine_url=engine_url, with_redis=with_redis, show=show, batch_size=batch_size
    )
    return asyncio.run(audit.run())
