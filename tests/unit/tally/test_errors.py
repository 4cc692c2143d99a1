"""Errors have a home: each package family's errors derive from one root, the root says
the exit status its commands end with (as each command's --help documents it), and the
CLI turns any of them into one line and that status in one place (tally/common.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from click.testing import CliRunner

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
from tally.cli import main
from tally.common import BadInput
from tests.unit.test_layers import RANK
from topics.admin import TopicConfigError, TopicMismatch
from topics.errors import TopicError

ROOT = Path(__file__).resolve().parents[3]

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
    BadInput: CANNOT_RUN,  # the CLI's own: an argument it cannot use
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


@pytest.mark.parametrize(
    ("args", "name"),
    [(["config"], "tally config"), (["bench", "replay"], "tally bench replay")],
)
def test_the_cli_ends_a_tally_error_with_one_line_and_its_status(
    args: list[str], name: str
) -> None:
    done = CliRunner().invoke(main, args, env={"TALLY_PARTITIONS": "abc"})
    assert done.exit_code == 2, done.output
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{name}: "), done.stderr
    assert "TALLY_PARTITIONS" in lines[0]


def test_sign_without_a_secret_is_refused_in_one_line() -> None:
    env = {"TALLY_CLIENT_KEY_ID": "client-a", "TALLY_CLIENT_SECRET": ""}
    done = CliRunner().invoke(main, ["sign", "GET", "/v1/accounts/alice/balances"], env=env)
    assert (done.exit_code, done.stdout) == (2, "")
    assert done.stderr == "tally sign: set TALLY_CLIENT_SECRET to the client's secret\n"


def test_no_command_configures_logging_but_core_logs() -> None:
    """Every process logs through core.logs.setup_logging (one format, aiokafka's
    retries folded): no module of ours calls logging.basicConfig itself."""
    found = []
    # The product's packages only: .venv and .cache hold other people's code.
    product = [ROOT / package for package in RANK]
    for path in sorted(p for folder in product for p in folder.rglob("*.py")):
        if path == ROOT / "core/logs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "basicConfig":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
