"""The benchmarks' shared table and labelled-line printer lays out what the benchmarks
printed with their own f-strings before: the same columns, widths and number formats."""

from __future__ import annotations

import math

from bench.report import Column, pair, pct, table


def test_a_table_lines_up_its_header_and_rows() -> None:
    columns = [
        Column("run", 22),
        Column("commands/s", 12, ",.0f"),
        Column("p99 ms", 9, ".1f"),
        Column("vs pipe", 9, ".1%"),
    ]
    lines = table(columns, [("engine exactly_once", 12345.6, 7.25, 0.5), ("raw pipe", 99999.0)])
    assert lines == [
        f"{'run':<22}{'commands/s':>12}{'p99 ms':>9}{'vs pipe':>9}",
        f"{'engine exactly_once':<22}{12345.6:>12,.0f}{7.25:>9.1f}{0.5:>9.1%}",
        f"{'raw pipe':<22}{99999.0:>12,.0f}",
    ]


def test_a_column_may_be_left_aligned_after_a_gap_and_a_str_cell_is_not_formatted() -> None:
    columns = [Column("phase", 8), Column("n", 4, ",.0f"), Column("bar", 0, left=True, gap=2)]
    assert table(columns, [("single", "n/a", "met")]) == [
        "phase      n  bar",
        "single   n/a  met",
    ]


def test_a_labelled_line_right_aligns_its_value_with_its_unit() -> None:
    assert (
        pair("start to /readyz 200", f"{7.25:.1f}s")
        == f"{'start to /readyz 200':<34}{7.25:>13.1f}s"
    )
    assert pair("balances", f"{10**6:,}") == f"{'balances':<34}{10**6:>14,}"
    assert pair("sample", 500, " ok") == f"{'sample':<34}{500:>14} ok"


def test_percentiles_of_none_one_and_many() -> None:
    assert math.isnan(pct([], 50))
    assert pct([3.0], 99) == 3.0
    assert pct([float(i) for i in range(1, 101)], 50) == 50.5
