"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from tally.settings import Settings, load


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The settings every test runs with: the local stack unless TALLY_* says otherwise."""
    return load(os.environ)


@pytest.fixture
def unique() -> str:
    """A short id that keeps one test's topics, keys and tables apart from every other's."""
    return uuid.uuid4().hex[:10]


# The 2-core CI machine runs these next to Kafka and PostgreSQL: timing-based health
# checks and per-example deadlines would fail on load, not on behaviour.
hypothesis_settings.register_profile(
    "tally", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile("tally")
