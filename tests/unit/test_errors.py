"""Errors have a home: each package family's errors derive from one root, the root says
the exit status its commands end with (as each command's --help documents it)."""

from __future__ import annotations

import pytest

from audit.run import AuditError
from bench.errors import BenchError
from core.errors import CANNOT_RUN, FAILED, TallyError, exit_status
from core.settings import SettingsError
from harness.chaos import ChaosError
from harness.errors import HarnessError
from harness.faults import FaultUnavailable
from harness.procs import EngineError
from harness.roundtrip import RoundTripError
from importer.run import ImportFailed
from replay.run import ReplayError
from sinks.errors import SinkError
from sinks.migrate import MigrationError
from topics.admin import TopicConfigError, TopicMismatch
from topics.errors import TopicError

# Each family's root and the status its --help (or core/errors.py) documents.
ROOTS: dict[type[TallyError], int] = {
    SettingsError: CANNOT_RUN,  # `tally config`: a bad variable, exit 2
    TopicError: CANNOT_RUN,
    SinkError: FAILED,  # `tally migrate` failed
    AuditError: CANNOT_RUN,  # "2 bad usage or a store ... unreachable"
    ImportFailed: CANNOT_RUN,  # "2 the import could not run"
    ReplayError: CANNOT_RUN,  # "2 refused or cannot start"
    HarnessError: CANNOT_RUN,  # chaos: "2 the run could not be carried out"
    BenchError: FAILED,
}
# Every family's errors, with the root they belong to.
MEMBERS: dict[type[TallyError], type[TallyError]] = {
    TopicMismatch: TopicError,
    TopicConfigError: TopicError,
    MigrationError: SinkError,
    ChaosError: HarnessError,
    FaultUnavailable: HarnessError,
    EngineError: HarnessError,
    RoundTripError: HarnessError,
}


def _instance(kind: type[TallyError]) -> TallyError:
    return kind("engine", "down") if kind is AuditError else kind("down")


@pytest.mark.parametrize("root", list(ROOTS), ids=lambda k: k.__name__)
def test_each_family_root_maps_to_its_documented_exit_status(root: type[TallyError]) -> None:
    assert issubclass(root, TallyError)
    assert exit_status(_instance(root)) == ROOTS[root]


@pytest.mark.parametrize("member", list(MEMBERS), ids=lambda k: k.__name__)
def test_each_error_belongs_to_its_family(member: type[TallyError]) -> None:
    assert issubclass(member, MEMBERS[member])


def test_a_round_trip_that_ran_and_differs_is_a_failure_not_a_refusal() -> None:
    # "1 a check failed" (demo, roundtrip-check), unlike the harness's "could not run".
    assert exit_status(RoundTripError("stores disagree")) == FAILED
    assert exit_status(MigrationError("x")) == FAILED and exit_status(EngineError("x")) == 2


def test_a_settings_error_is_still_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)  # callers that catch ValueError
