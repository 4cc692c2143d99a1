"""What every benchmark shares for its output: the error that says it could not measure,
percentiles, the JSON report under reports/, and the printed table or labelled lines.

A table is a list of columns (title, width, number format); its rows are printed under a
header line, the first column left-aligned and the others right-aligned, so that every
benchmark's table reads the same way. Labelled lines (`pair`) are the one-value-a-line
form of the recovery and audit benchmarks."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError

__all__ = ["BenchError", "Column", "pair", "pct", "show", "table", "write_report"]

# Labelled lines: the label's width, then the value right-aligned in this many columns.
label_width = 34
value_width = 14


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    fmt: str = ""  # the format spec of the values, e.g. ",.0f"
    left: bool = False  # the first column is left-aligned whatever this says
    gap: int = 0  # spaces before the column


def table(columns: Sequence[Column], rows: Iterable[Sequence[object]]) -> list[str]:
    """The header line and one line per row; a row may have fewer cells than columns
    (the trailing ones are left out), and a cell that is a str is printed as it is."""
    return [_line(columns, [c.title for c in columns]), *(_line(columns, r) for r in rows)]


def _line(columns: Sequence[Column], cells: Sequence[object]) -> str:
    out = []
    for i, (column, cell) in enumerate(zip(columns, cells, strict=False)):
        align = "<" if i == 0 or column.left else ">"
        spec = "" if isinstance(cell, str) else column.fmt
        out.append(" " * column.gap + format(cell, f"{align}{column.width}{spec}"))
    return "".join(out)


def pair(label: str, value: object, note: str = "") -> str:
    """One labelled value: `value` (formatted already, with its unit) right-aligned."""
    return f"{label:<{label_width}}{value!s:>{value_width}}{note}"


def pct(values: list[float], pct: int) -> float:
    """The `pct`th percentile (inclusive method); NaN when there is nothing to rank."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def write_report(report: Path, out: object) -> None:
    """A benchmark's JSON report (every benchmark writes one under reports/)."""
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(out, indent=2) + "\n")


def show(say: Callable[[str], object], lines: Iterable[str], report: Path | None = None) -> None:
    """Print a benchmark's result after a blank line, then where its report went."""
    say("")
    for line in lines:
        say(line)
    if report is not None:
        say(f"\nreport written to {report}")
