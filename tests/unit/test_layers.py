"""The packages form layers, and imports run one way: down. A package may import its
own modules and the layers below it, never one above (an upward import is a cycle
waiting to happen, and a sign the lower package knows too much). The ingress talks to
the engine only through the interface the engine publishes for that, `streams.client`.

The check reads every import statement of the product's modules, function-local ones
included, so a lazy import cannot hide an upward arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Bottom first. Packages on one line are one layer: they may not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),  # settings, logs, progress, supervision: imports nothing of ours
    ("topics",),  # names, schemas, codec, limits
    ("streams",),  # the ledger rules and the engine
    ("sinks",),  # projections into PostgreSQL and Redis
    ("notify",),  # delivery of results to subscribers
    ("ingress",),  # the HTTP API
    ("audit", "importer", "replay"),  # operator tools
    ("harness",),  # workloads, processes, faults, checks, chaos, demo
    ("bench",),  # benchmarks
    ("tally",),  # the CLI
)
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}
# Modules of a lower package that a higher one may not import although the rank allows
# it: (importer, imported) -> the only modules allowed.
NARROW = {("ingress", "streams"): {"streams.client"}}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of the file."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if "." in node.module:
                found.append((node.lineno, node.module))
            else:  # `from package import module` imports package.module
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations(root: Path) -> list[str]:
    wrong: list[str] = []
    for package, rank in RANK.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, module in imports_of(path):
                top = module.split(".")[0]
                if top not in RANK or top == package:
                    continue
                where = f"{path.relative_to(root)}:{line} imports {module}"
                if RANK[top] > rank:
                    wrong.append(f"{where} (upward: {top} is above {package})")
                elif RANK[top] == rank:
                    wrong.append(f"{where} (sideways: {top} is beside {package})")
                narrow = NARROW.get((package, top))
                if narrow is not None and not any(
                    module == allowed or module.startswith(allowed + ".") for allowed in narrow
                ):
                    wrong.append(f"{where} (only {sorted(narrow)} of {top} is for {package})")
    return wrong


def test_every_product_package_has_a_layer() -> None:
    packages = {
        p.parent.name
        for p in ROOT.glob("*/__init__.py")
        if p.parent.name not in {"tests"} and not p.parent.name.startswith(".")
    }
    assert packages == set(RANK), "give each top-level package a place in LAYERS"


def test_no_package_imports_upward_or_sideways() -> None:
    assert violations(ROOT) == []


@pytest.mark.parametrize(
    ("package", "source", "expected"),
    [
        ("core", "from topics.names import engine_group\n", "upward"),
        ("streams", "def f():\n    import tally.cli\n", "upward"),
        ("audit", "from importer import run\n", "sideways"),
        ("ingress", "from streams.engine import Engine\n", "only"),
        ("ingress", "from streams import web\n", "only"),
    ],
)
def test_the_check_catches_a_wrong_arrow(
    tmp_path: Path, package: str, source: str, expected: str
) -> None:
    """The check is not vacuous: a planted wrong import is reported."""
    for name in RANK:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / package / "planted.py").write_text(source)
    found = violations(tmp_path)
    assert len(found) == 1 and expected in found[0], found


def test_the_ingress_may_use_the_engine_client() -> None:
    assert violations_for("ingress", "from streams.client import ShardOwners\n") == []
    assert violations_for("ingress", "from streams import client\n") == []


def violations_for(package: str, source: str) -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as raw:
        root = Path(raw)
        for name in RANK:
            (root / name).mkdir()
            (root / name / "__init__.py").write_text("")
        (root / package / "planted.py").write_text(source)
        return violations(root)
