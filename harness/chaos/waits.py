"""The chaos run's waits per fault: for the commands produced from a fault until the
next one, the longest wait for a result and the longest silence, on the shards that did
not move (the same owner before and after the fault) and on those that did (issue #15).
A fault that strikes one worker (kill9, sigstop, a worker leaving) puts that worker's
shards in a group of their own, "struck", whether they moved or came back to it (a
killed worker restarted within the session timeout gets its shards back: they did not
move, but they waited for it); kept and moved are then the other workers' shards.

The measure is harness.waits, the one `tally bench failover` uses. The owners before a
fault are read from every worker's /readyz just before it is injected; the owners after
it are those read before the next fault (by then the group has settled, or the shards
still unserved count as moved), and for the last fault those after the drain. A fault's
window starts `lead_s` before it (commands in flight when it struck wait for it too)
and ends `lead_s` before the next fault.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from harness.chaos.plan import Fault
from harness.chaos.record import FaultWaits
from harness.waits import group, moved, shard_waits

lead_s = 0.5


@dataclass
class Mark:
    """A fault as injected: when (monotonic, and seconds into the load), the owners of
    the shards just before it (shard -> worker index), and the worker it struck (None:
    a fault of a service, or a worker joining)."""

    fault: Fault
    at: float
    at_s: float
    owners: dict[int, int]
    struck: int | None = None


def fault_waits(
    marks: Sequence[Mark],
    final_owners: Mapping[int, int],
    sent: Mapping[bytes, tuple[int, float]],
    heard: Mapping[bytes, float],
    *,
    until: float,
) -> list[FaultWaits]:
    """One record per injected fault, in order (see the module's docstring)."""
    out = []
    for i, mark in enumerate(marks):
        after = marks[i + 1].owners if i + 1 < len(marks) else dict(final_owners)
        end = marks[i + 1].at - lead_s if i + 1 < len(marks) else float("inf")
        waits = shard_waits(sent, heard, until=until, start=mark.at - lead_s, end=end)
        kept, gone = moved(mark.owners, after)
        struck = [s for s, n in mark.owners.items() if n == mark.struck]
        out.append(
            FaultWaits(
                at_s=round(mark.at_s, 1),
                kind=mark.fault.kind,
                owners_before=dict(mark.owners),
                owners_after=after,
                kept=group("kept", waits, [s for s in kept if s not in struck]),
                moved=group("moved", waits, [s for s in gone if s not in struck]),
                struck_worker=mark.struck,
                struck=group(f"worker-{mark.struck}'s", waits, struck),
            )
        )
    return out
