"""`scripts/services.sh up` is idempotent: a second start reuses, never spawns a second server."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "services.sh"


def _count(pattern: str) -> int:
    found = subprocess.run(["pgrep", "-fc", pattern], capture_output=True, text=True)
    return int(found.stdout.strip() or 0)


def test_second_up_reuses_every_service() -> None:
    # The session fixture already needed the stack up, so this is at least the second start.
    done = subprocess.run([SCRIPT, "up"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    for service in ("kafka", "postgres", "redis"):
        assert any(
            line.startswith(f"{service}:") and "already running" in line for line in lines
        ), done.stdout
    # Exactly one of each on the machine, whichever checkout started it.
    assert _count(r"java .*kafka\.Kafka ") == 1
    assert _count(r"postgres -D ") == 1
    assert _count(r"redis-server 127\.0\.0\.1:") == 1


def test_status_reports_all_three_up() -> None:
    done = subprocess.run([SCRIPT, "status"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    for service in ("kafka", "postgres", "redis"):
        assert service in done.stdout
