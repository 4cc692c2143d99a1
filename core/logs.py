"""Logging for every Tally process, set up in one place: text or JSON lines, aiokafka's
expected chatter kept below WARNING, and one start line with the version and settings.

aiokafka logs at INFO for every connection, group join and assignment (10-20 lines a
start), and at WARNING or ERROR for conditions its own clients retry and recover from:
a fetch of offsets, a metadata request or a produce that meets a partition whose
leader is not elected yet (right after a topic is created, or during a broker's
leader move), or a group coordinator that is still loading. Those retries are part of
aiokafka's normal operation, and the ones that do not recover surface as exceptions
in our code, which logs them itself; so the filter below folds exactly those messages
to DEBUG (shown with TALLY_LOG_LEVEL=DEBUG) and leaves every other aiokafka WARNING
and ERROR as it is.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from importlib import metadata
from typing import Any

from aiohttp.http_exceptions import BadHttpMessage

from core.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The retriable errors aiokafka logs and then retries on its own (Kafka error names).
EXPECTED_RETRIES = (
    "NotLeaderForPartitionError",
    "LeaderNotAvailableError",
    "UnknownTopicOrPartitionError",
    "CoordinatorNotAvailableError",
    "NotCoordinatorError",
    "CoordinatorLoadInProgressError",
    "GroupCoordinatorNotAvailableError",
    "RebalanceInProgressError",
)
# aiokafka's loggers whose INFO lines are start-up chatter (kept at WARNING unless DEBUG).
CHATTY = ("aiokafka", "kafka")


def version() -> str:
    """The installed Tally's version ("unknown" when run from a bare source tree)."""
    try:
        return metadata.version("tally")
    except metadata.PackageNotFoundError:
        return "unknown"


class ExpectedRetries(logging.Filter):
    """Fold aiokafka's WARNING/ERROR lines about errors it retries itself to DEBUG;
    drop them unless DEBUG lines are shown."""

    def __init__(self, show_debug: bool) -> None:
        super().__init__()
        self.show_debug = show_debug

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka") or record.levelno < logging.WARNING:
            return True
        text = record.getMessage()
        if not any(name in text for name in EXPECTED_RETRIES):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None  # a retried error needs no traceback
        return self.show_debug


class ClientErrors(logging.Filter):
    """aiohttp logs a request it could not parse (a header line past its limit, bytes
    that are not HTTP) at ERROR with a traceback, from every web server of ours: it is
    the client's error, answered 400. Fold it to one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "aiohttp.server" or not record.exc_info:
            return True
        error = record.exc_info[1]
        if isinstance(error, BadHttpMessage):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "refused a malformed request: %s", (_first_line(error),)
            record.exc_info = record.exc_text = None
        return True


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the
    traceback if any, and any structured fields given as `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        out: dict[str, Any] = {
            "time": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def handler_for(settings: Settings, stream: Any = None) -> logging.Handler:
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ExpectedRetries(show_debug=settings.log_level == "DEBUG"))
    handler.addFilter(ClientErrors())
    return handler


def setup_logging(
    settings: Settings, process: str, *, stream: Any = None, quiet: bool = False
) -> None:
    """Configure the root logger for this process and log its one start line: the
    process, the version and the effective settings (secrets masked). `quiet` (a
    command that prints its own report, such as the demo): WARNING and up only, no
    start line."""
    level = "WARNING" if quiet and settings.log_level != "DEBUG" else settings.log_level
    logging.basicConfig(level=level, handlers=[handler_for(settings, stream)], force=True)
    if settings.log_level != "DEBUG":
        for name in CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
    if quiet:
        return
    shown = settings.redacted()
    logging.getLogger("tally").info(
        "%s starting: tally %s, settings %s",
        process,
        version(),
        json.dumps(shown, separators=(",", ":")),
        extra={"fields": {"process": process, "version": version(), "settings": shown}},
    )
