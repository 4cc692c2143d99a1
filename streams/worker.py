"""Run one engine worker process: topics ensured, local state checked, Faust worker started.

Local state after a crash is not trusted. Faust writes table changes into RocksDB as it
applies them, but under exactly-once they only become real when the partition's Kafka
transaction commits; a worker killed mid-transaction leaves RocksDB ahead of the
changelog, and reprocessing the aborted records against it would answer them as
duplicates of effects that never happened. So a worker that did not stop cleanly starts
from an empty state directory and restores every table from the changelog topics
(read-committed), exactly as a worker whose disk was lost.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import faust

from streams.app import Engine
from tally.settings import Settings
from topics.admin import ensure_topics

log = logging.getLogger(__name__)

CLEAN_MARKER = "tally-clean-shutdown"


class Worker(faust.Worker):
    """faust's worker without its terminal spinner and stdout redirection.

    The spinner sets the root logger to DEBUG so that it turns on every record; every
    debug call in aiokafka and faust then builds a LogRecord, about a tenth of the
    engine's CPU under load. Prints stay prints, so job output is not logged twice.
    """

    def __init__(self, app: Any, *, loglevel: str) -> None:
        super().__init__(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        logger.setLevel(level)


def prepare_state_dir(data_dir: Path) -> bool:
    """Make `data_dir` safe to start from; return True when it was wiped as unclean."""
    data_dir.mkdir(parents=True, exist_ok=True)
    marker = data_dir / CLEAN_MARKER
    contents = [p for p in data_dir.iterdir() if p.name != CLEAN_MARKER]
    wiped = False
    if contents and not marker.exists():
        for path in contents:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        wiped = True
    marker.unlink(missing_ok=True)
    return wiped


def mark_clean(data_dir: Path) -> None:
    (data_dir / CLEAN_MARKER).write_text("the last worker on this directory stopped cleanly\n")


def run(settings: Settings) -> int:
    """Run the worker until it is stopped (SIGTERM/SIGINT); return its exit code."""
    logging.basicConfig(level=settings.log_level)
    specs = Engine.all_topic_specs(settings, Engine.app_id_of(settings))
    asyncio.run(ensure_topics(settings.kafka_bootstrap, specs))
    data_dir = Path(settings.data_dir)
    if prepare_state_dir(data_dir):
        log.warning(
            "state in %s was not left by a clean stop: discarded, restoring from changelogs",
            data_dir,
        )
    engine = Engine(settings)
    worker = Worker(engine.app, loglevel=settings.log_level.lower())
    code = 1
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    if code == 0 and engine.app.crash_reason is None:
        mark_clean(data_dir)
    return code
