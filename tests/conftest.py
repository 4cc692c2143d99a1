"""Fixtures shared by every test layer."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from core.settings import Settings, load

# The layer a test belongs to is the folder it lives in. A `pytestmark` in a conftest has
# no effect (a conftest is not a test module), so the mark is set here, at collection,
# and `pytest -m integration` / `-m "not fault"` select by layer.
LAYERS = ("unit", "integration", "fault")
_TESTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with the layer (`unit`, `integration`, `fault`) of its folder."""
    for item in items:
        relative = Path(str(item.path)).resolve().relative_to(_TESTS_DIR)
        layer = relative.parts[0]
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


# Variables that steer the test run itself (TALLY_TEST_KEEP_TOPICS, TALLY_FUZZ_SEED,
# TALLY_CHAOS_SEED...), not the product: `load` rightly rejects them as unknown settings.
TEST_ONLY_PREFIXES = ("TALLY_TEST_", "TALLY_FUZZ_", "TALLY_CHAOS_")


def _descendants(pid: int) -> set[int]:
    """The live (not zombie) processes below `pid`."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            for child in children:
                try:
                    state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except (OSError, IndexError):
                    continue
                if state != "Z" and child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


@pytest.fixture(autouse=True)
def no_process_outlives_its_test() -> Iterator[None]:
    """Every process a test (or its function-scoped fixtures) started is gone when it
    ends: one left running would hold ports, topics and CPU for the rest of the run.
    Processes of module- and session-scoped fixtures are started before this snapshot
    and stopped after this check."""
    before = _descendants(os.getpid())
    yield
    deadline = time.monotonic() + 5
    while (left := _descendants(os.getpid()) - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        lines = [f"{pid}: {_cmdline(pid)}" for pid in sorted(left)]
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail("processes outlived the test (now killed):\n" + "\n".join(lines))


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The settings every test runs with: the local stack unless TALLY_* says otherwise."""
    return load({k: v for k, v in os.environ.items() if not k.startswith(TEST_ONLY_PREFIXES)})


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
