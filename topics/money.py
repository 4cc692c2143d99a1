"""Conservation, defined once: which money enters and leaves a deployment, and the check
that the balances hold exactly that, per asset.

Money enters by `deposit` and leaves by `withdraw` and by a `capture` that names no payee
(the captured part of the hold leaves with it). Nothing else creates or destroys money
(`streams.ledger` keeps it so): a transfer, a disbursement or a capture to an account
debits the payer, and its credits, or the refunds of the credits that could not be
applied, put the same money on other balances; a hold, a release and an expiry move it
between `available` and `held` of one balance. So at a quiescent point (no credit or
refund in flight), per asset:

    sum of (available + held) over all balances == deposits + withdrawals + captured out
    the net of every other movement == 0

where withdrawals and captured out are negative (they are the entries' deltas). The demo,
the benchmarks and the chaos harness (from the events they read) and the audit (from the
ledger in PostgreSQL) all judge a run with `conservation`; they differ only in where they
read the entries and the balances.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from topics.schema import Result, Status


class Flow(enum.StrEnum):
    """Where the money of an entry goes: into the deployment, out of it, or between (or
    within) its balances."""

    DEPOSIT = "deposit"
    WITHDRAW = "withdraw"
    CAPTURE_OUT = "capture"  # a capture to no account
    INTERNAL = "internal"


def flow_of(kind: str, *, pays_out: bool) -> Flow:
    """The flow of the entries of an applied command of `kind`. `pays_out` says of a
    capture that it names no payee (it emitted no credit); it means nothing for the
    other kinds."""
    if kind == "deposit":
        return Flow.DEPOSIT
    if kind == "withdraw":
        return Flow.WITHDRAW
    if kind == "capture" and pays_out:
        return Flow.CAPTURE_OUT
    return Flow.INTERNAL


def result_flow(result: Result) -> Flow:
    """The flow of a result's entries. A capture to an account emits its credit
    (`Result.emitted` is 1); one that emits nothing paid out of the system."""
    return flow_of(result.kind, pays_out=result.emitted == 0)


def flows_of(results: Iterable[Result]) -> Counter[tuple[str, Flow]]:
    """The entries of the applied results summed per (asset, flow): each entry counts
    `delta_available + delta_held`. Rejected and duplicate results have no entries."""
    flows: Counter[tuple[str, Flow]] = Counter()
    for result in results:
        if result.status is not Status.APPLIED:
            continue
        flow = result_flow(result)
        for e in result.entries:
            flows[(e.asset, flow)] += e.delta_available + e.delta_held
    return flows


def holdings(balances: Iterable[tuple[str, int, int]]) -> Counter[str]:
    """`available + held` summed per asset, from (asset, available, held) triples."""
    out: Counter[str] = Counter()
    for asset, available, held in balances:
        out[asset] += available + held
    return out


@dataclass(frozen=True)
class AssetFlow:
    """One asset's money: what the balances hold against what came in and went out.
    `withdrawals` and `captured_out` are negative; `internal` is the net of every
    movement between or within balances, 0 once nothing is in flight."""

    asset: str
    balances: int
    deposits: int = 0
    withdrawals: int = 0
    captured_out: int = 0
    internal: int = 0

    @property
    def external(self) -> int:
        """What the balances must hold: the money that entered less what left."""
        return self.deposits + self.withdrawals + self.captured_out

    @property
    def ok(self) -> bool:
        return self.balances == self.external and self.internal == 0

    def line(self) -> str:
        mark = "=" if self.balances == self.external else "!="
        return (
            f"{self.asset}: balances {self.balances} {mark} deposits {self.deposits}"
            f" - withdrawals {-self.withdrawals} - captured out {-self.captured_out};"
            f" between accounts net {self.internal}"
        )


def conservation(
    balances: Mapping[str, int], flows: Mapping[tuple[str, Flow], int]
) -> list[AssetFlow]:
    """Per asset, in asset order, the balances' sum (`holdings`) next to the entries'
    sums by flow (`flows_of`, or the audit's sums from the ledger). The money is
    conserved when every one is `ok`."""
    assets = sorted(set(balances) | {asset for asset, _ in flows})
    return [
        AssetFlow(
            asset,
            balances.get(asset, 0),
            deposits=flows.get((asset, Flow.DEPOSIT), 0),
            withdrawals=flows.get((asset, Flow.WITHDRAW), 0),
            captured_out=flows.get((asset, Flow.CAPTURE_OUT), 0),
            internal=flows.get((asset, Flow.INTERNAL), 0),
        )
        for asset in assets
    ]
