"""Integration tests talk to the real local stack; they fail loudly when it is not up."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

import pytest

from tally.settings import Settings

pytestmark = pytest.mark.integration


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def stack(settings: Settings) -> None:
    """Fail every integration test at once, with the fix, when a service is down."""
    kafka_host, _, kafka_port = settings.kafka_bootstrap.split(",")[0].rpartition(":")
    pg = urlparse(settings.pg_dsn)
    rd = urlparse(settings.redis_url)
    down = [
        name
        for name, host, port in (
            ("kafka", kafka_host, int(kafka_port)),
            ("postgresql", pg.hostname or "127.0.0.1", pg.port or 5432),
            ("redis", rd.hostname or "127.0.0.1", rd.port or 6379),
        )
        if not _reachable(host, port)
    ]
    if down:
        pytest.fail(f"services not reachable: {', '.join(down)} (start them: make services)")
