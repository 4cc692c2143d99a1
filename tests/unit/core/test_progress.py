"""Progress lines when stderr is not a terminal."""

from __future__ import annotations

from core.progress import Progress


def test_plain_lines_carry_done_total_rate_and_eta() -> None:
    lines: list[str] = []
    with Progress("replay", 1000, unit="events", say=lines.append, every_s=0, tty=False) as p:
        p.add(250)
        p.add(250)
    assert lines[0].startswith("replay: 250/1,000 events (25%), ")
    assert "ETA" in lines[0] and lines[1].startswith("replay: 500/1,000 events (50%)")
    assert lines[-1].startswith("replay: done, 500 events in ")


def test_unknown_total_has_no_eta() -> None:
    lines: list[str] = []
    with Progress("scan", None, say=lines.append, every_s=0, tty=False) as p:
        p.add(7)
    assert lines[0].startswith("scan: 7 records, ") and "ETA" not in lines[0]
