"""The audit's report and its summary, as `tally audit` prints it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from audit.rows import KINDS, STORES, Mismatch
from topics.money import AssetFlow


@dataclass
class Report:
    schema: str
    shards: int
    sources: list[str]
    skipped: list[str]
    balances: int
    compared: Counter[str]
    mismatches: Counter[str]
    first: list[Mismatch]
    flows: list[AssetFlow]
    seconds: float

    @property
    def ok(self) -> bool:
        return not sum(self.mismatches.values())


def render(report: Report) -> str:
    lines = [
        f"tally audit: schema {report.schema!r}, {report.shards} shards, "
        f"{report.balances:,} balances in {report.seconds:.1f}s",
        "  each store against the ledger (last breakpoint + later entries):",
        f"    {'ledger (recomputed)':<22}{report.compared['ledger']:>12,} balances",
    ]
    for source in report.sources:
        bad = report.mismatches[source]
        mark = "ok" if not bad else "FAIL"
        lines.append(
            f"    {STORES[source]:<22}{report.compared[source]:>12,} balances"
            f"  [{mark:>4}] {bad:,} differ"
        )
    for source in report.skipped:
        lines.append(f"    {STORES[source]:<22}{'skipped':>12}")
    gaps, breaks = report.mismatches["seq_gap"], report.mismatches["breakpoint"]
    lines += [
        "  the ledger itself:",
        f"    [{'ok' if not gaps else 'FAIL':>4}] seq 1..n without gaps: "
        f"{gaps:,} balances with gaps",
        f"    [{'ok' if not breaks else 'FAIL':>4}] breakpoints agree with all entries: "
        f"{breaks:,} differ",
    ]
    wrong = report.mismatches["conservation"]
    lines.append(
        f"    [{'ok' if not wrong else 'FAIL':>4}] conservation per asset "
        "(balances = deposits - withdrawals - captures out):"
    )
    lines += [f"           {flow.line()}" for flow in report.flows] or ["           no money"]
    if report.ok:
        lines.append("result: everything agrees")
        return "\n".join(lines)
    total = sum(report.mismatches.values())
    by_kind = ", ".join(f"{k} {report.mismatches[k]:,}" for k in KINDS if report.mismatches[k])
    lines.append(f"mismatches: {total:,} ({by_kind})")
    if report.first:
        lines.append(f"first {len(report.first)}:")
        lines += [f"  {m.line()}" for m in report.first]
    lines.append(f"result: {total:,} mismatch{'es' if total != 1 else ''}")
    return "\n".join(lines)
