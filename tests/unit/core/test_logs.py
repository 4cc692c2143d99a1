"""The one logging setup: JSON lines, the start line, aiokafka's expected retries."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import msgspec
import pytest
from aiohttp.http_exceptions import LineTooLong

from core.logs import ClientErrors, ExpectedRetries, JsonFormatter, setup_logging
from core.settings import Settings


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    kafka_level = logging.getLogger("aiokafka").level
    yield
    root.handlers[:], root.level = handlers, level
    logging.getLogger("aiokafka").setLevel(kafka_level)


def _record(name: str, level: int, message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


def test_json_formatter_writes_one_object_per_line_with_fields_and_traceback() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord(
            "x.y", logging.ERROR, __file__, 1, "a %s\nb", ("z",), sys.exc_info()
        )
    record.fields = {"version": "1", "message": "not overwritten"}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "ERROR" and out["logger"] == "x.y"
    assert out["message"] == "a z\nb"
    assert out["version"] == "1"
    assert "ValueError: bad" in out["exception"]
    assert out["time"].endswith("Z")


def test_expected_aiokafka_retries_are_folded_below_warning() -> None:
    quiet, debug = ExpectedRetries(show_debug=False), ExpectedRetries(show_debug=True)
    retried = _record(
        "aiokafka.consumer.fetcher", logging.ERROR,
        "Failed fetch offsets for %s: %s", "t-0", "NotLeaderForPartitionError",
    )  # fmt: skip
    assert not quiet.filter(retried)
    assert debug.filter(retried) and retried.levelno == logging.DEBUG
    other = _record("aiokafka.conn", logging.ERROR, "Unable to connect to node 1")
    assert quiet.filter(other) and other.levelno == logging.ERROR
    ours = _record("sinks.runner", logging.WARNING, "NotLeaderForPartitionError in our code")
    assert quiet.filter(ours) and ours.levelno == logging.WARNING


def test_setup_logs_one_json_start_line_with_secrets_masked() -> None:
    secret = "s3cret-s3cret-s3cret"
    settings = msgspec.structs.replace(
        Settings(),
        log_format="json",
        ingress_keys=f"k1:{secret}",
        pg_dsn="postgresql://tally:pw-in-dsn@db:5432/tally",
    )
    stream = io.StringIO()
    setup_logging(settings, "ingress", stream=stream)
    logging.getLogger("aiokafka.consumer.group_coordinator").info("Joined group")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    start = json.loads(lines[0])
    assert start["process"] == "ingress" and start["version"]
    assert start["settings"]["ingress_keys"] == "k1:***"
    assert secret not in lines[0] and "pw-in-dsn" not in lines[0]


def test_a_malformed_request_is_one_info_line_not_an_error_with_a_traceback() -> None:
    try:
        raise LineTooLong(b"aaaa" * 100, 8190)
    except LineTooLong:
        record = logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
            ("127.0.0.1",), sys.exc_info(),
        )  # fmt: skip
    assert ClientErrors().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage().startswith("refused a malformed request: LineTooLong")
    other = _record("aiohttp.server", logging.ERROR, "Error handling request")
    assert ClientErrors().filter(other) and other.levelno == logging.ERROR
