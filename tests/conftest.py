"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
import uuid

import pytest

from tally.settings import Settings, load


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The settings every test runs with: the local stack unless TALLY_* says otherwise."""
    return load(os.environ)


@pytest.fixture
def unique() -> str:
    """A short id that keeps one test's topics, keys and tables apart from every other's."""
    return uuid.uuid4().hex[:10]
