"""The image cannot be built here (no Docker engine), so what can be checked without one
is: every COPY source exists in the repository, every package the CLI imports is
copied, and the entrypoint is the `tally` CLI that pyproject.toml installs."""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _copies() -> list[list[str]]:
    copies = []
    for word, rest in _instructions():
        if word in ("COPY", "ADD"):
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            copies.append(args[:-1])  # the last is the destination
    return copies


def test_every_copy_source_exists() -> None:
    sources = [s for args in _copies() for s in args]
    assert sources, "the Dockerfile copies nothing"
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"COPY sources not in the repository: {missing}"


def test_every_package_is_copied() -> None:
    copied = {s.rstrip("/") for args in _copies() for s in args}
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests"}
    assert packages <= copied, f"packages the image lacks: {sorted(packages - copied)}"
    assert "migrations" in copied  # `tally migrate` reads them beside the package


def test_entrypoint_is_the_tally_cli() -> None:
    entry = [rest for word, rest in _instructions() if word == "ENTRYPOINT"]
    assert len(entry) == 1
    assert json.loads(entry[0]) == ["tally"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tally"] == "tally.cli:main"
    users = [rest for word, rest in _instructions() if word == "USER"]
    assert users and users[-1] != "root", "the processes run as an unprivileged user"
