"""Fault tests kill real processes; they need the same real stack as integration tests.

A fault test that cannot break the service it is about fails with the reason: a skip
would read as a pass in CI while nothing was tested. A developer whose stack was not
started by scripts/services.sh (a broker in Docker, a PostgreSQL of the system) opts out
on purpose with TALLY_TEST_NO_SERVICE_FAULTS=1, and the skip then says so.
"""

from __future__ import annotations

import os

import pytest

from core.settings import Settings
from harness import faults
from tests.integration.conftest import stack

__all__ = ["local_broker", "local_postgres", "stack"]

OPT_OUT = "TALLY_TEST_NO_SERVICE_FAULTS"


def unavailable(exc: faults.FaultUnavailable) -> None:
    """Fail (or, opted out, skip) a test whose fault cannot be injected here."""
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(f"{OPT_OUT}=1: not injecting this fault ({exc})")
    pytest.fail(
        f"cannot inject the fault: {exc}. Start the services with `make services`, or set"
        f" {OPT_OUT}=1 to skip the tests that stop a service",
        pytrace=False,
    )


@pytest.fixture
def local_broker() -> faults.Broker:
    """The local Kafka broker the test may stop; found before the test starts anything."""
    try:
        return faults.broker()
    except faults.FaultUnavailable as exc:
        unavailable(exc)
        raise  # unreachable: unavailable() fails or skips


@pytest.fixture
async def local_postgres(settings: Settings) -> faults.PgCluster:
    """The local PostgreSQL server the test may stop; found before the test starts anything."""
    try:
        return await faults.pg_cluster(settings.pg_dsn)
    except faults.FaultUnavailable as exc:
        unavailable(exc)
        raise  # unreachable: unavailable() fails or skips
