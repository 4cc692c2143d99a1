"""The one in-memory shard each ledger rule test runs its commands against."""

from __future__ import annotations

import pytest

from streams.memory import MemoryShard


@pytest.fixture
def shard() -> MemoryShard:
    return MemoryShard()
