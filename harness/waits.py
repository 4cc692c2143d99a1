"""How long shards went without answering, measured from outside the engine: the one
measure of `tally bench failover` and of the chaos harness's per-fault waits.

What a client of a shard sees when a worker fails is a wait: it produced a command and
its result comes late. For every command record produced, the caller notes when it was
produced and on which shard, and a read_committed reader of the events topic notes when
its result was first seen (harness.collector). Per shard, two figures come out:

- the longest wait: the most any one command waited from its produce to its result (a
  command never answered waits until the end of the watch);
- the longest silence: the longest stretch during which the shard had a command
  pending and no result arrived for it. Under a steady load the two are close; the
  silence does not depend on when a command happened to be sent, so it is the better
  figure for "how long was the shard stopped".

A fault's shards are then grouped by owner: in the benchmark those of the worker that
failed and those of the workers that survived, in the chaos run those whose owner is
the same before and after the fault ("kept") and those that moved. Ownership is what
each worker's /readyz says it serves (streams/web.py: the shards assigned, recovered
and serving).

Pure but for `serving`/`owners`, which ask the workers; the keys that identify a
command record are the caller's (a command id when each is sent once, the record's
`tally-source` place when ids repeat).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import aiohttp

K = TypeVar("K", bound=Hashable)  # what names a command record: its id, its place

# How long one /readyz may take before the worker counts as serving nothing.
readyz_timeout_s = 5.0


@dataclass(frozen=True)
class ShardWait:
    """One shard's figures over the commands of a watch."""

    shard: int
    commands: int
    answered: int
    max_wait_s: float
    max_silence_s: float


@dataclass(frozen=True)
class GroupWait:
    """The worst of a group of shards (the survivors', the failed worker's; kept, moved)."""

    name: str
    shards: list[int]
    commands: int
    unanswered: int
    max_wait_s: float
    max_silence_s: float


def shard_waits(
    sent: Mapping[K, tuple[int, float]],
    answered: Mapping[K, float],
    *,
    until: float,
    start: float = float("-inf"),
    end: float = float("inf"),
) -> dict[int, ShardWait]:
    """Per shard, the waits of the commands `sent` (key -> (shard, produced at)) with a
    produce time in [start, end), given when each was first `answered` (key -> time, on
    the same clock). A command not answered counts as pending until `until`."""
    per_shard: dict[int, list[tuple[float, float | None]]] = {}
    for key, (shard, at) in sent.items():
        if start <= at < end:
            per_shard.setdefault(shard, []).append((at, answered.get(key)))
    out = {}
    for shard, commands in sorted(per_shard.items()):
        closed = [(s, max(s, a) if a is not None else max(s, until)) for s, a in commands]
        out[shard] = ShardWait(
            shard=shard,
            commands=len(commands),
            answered=sum(1 for _, a in commands if a is not None),
            max_wait_s=max(a - s for s, a in closed),
            max_silence_s=longest_silence(closed),
        )
    return out


def longest_silence(commands: Iterable[tuple[float, float]]) -> float:
    """The longest stretch with a command pending and no answer, over (sent, answered)
    pairs: a sweep over the sends and answers in time order. A silence starts at a send
    onto an idle shard or at an answer that leaves others pending, and ends at the next
    answer."""
    events = sorted(
        (t, kind) for sent, answered in commands for t, kind in ((sent, 0), (answered, 1))
    )
    pending = 0
    since = 0.0
    best = 0.0
    for t, kind in events:
        if kind == 0:
            if pending == 0:
                since = t
            pending += 1
        else:
            best = max(best, t - since)
            pending -= 1
            since = t
    return best


def group(name: str, waits: Mapping[int, ShardWait], shards: Iterable[int]) -> GroupWait:
    """The worst figures over `shards` (a shard with no command counts as nothing)."""
    chosen = sorted(set(shards))
    found = [waits[s] for s in chosen if s in waits]
    return GroupWait(
        name=name,
        shards=chosen,
        commands=sum(w.commands for w in found),
        unanswered=sum(w.commands - w.answered for w in found),
        max_wait_s=max((w.max_wait_s for w in found), default=0.0),
        max_silence_s=max((w.max_silence_s for w in found), default=0.0),
    )


def moved(before: Mapping[int, int], after: Mapping[int, int]) -> tuple[list[int], list[int]]:
    """The shards whose owner is the same before and after a fault (kept) and the others
    (moved: another owner, or served before and not after, or the other way round)."""
    shards = sorted(set(before) | set(after))
    kept = [s for s in shards if s in before and before.get(s) == after.get(s)]
    return kept, [s for s in shards if s not in kept]


def exactly_once(
    expected: Iterable[str], results: Mapping[str, Sequence[object]]
) -> tuple[list[str], list[str]]:
    """The command ids (each sent once) with no result, and those with more than one."""
    counts = Counter({i: len(results.get(i, ())) for i in expected})
    return (
        sorted(i for i, n in counts.items() if n == 0),
        sorted(i for i, n in counts.items() if n > 1),
    )


class Worker(Protocol):
    """What `serving` needs of a worker: its /readyz body (harness.procs.EngineProcess)."""

    async def readyz(self) -> dict[str, Any]: ...


async def serving(worker: Worker) -> list[int]:
    """The shards a worker serves, by its /readyz; none if it does not answer (dead,
    stopped, or busy past the timeout)."""
    try:
        body = await asyncio.wait_for(worker.readyz(), readyz_timeout_s)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return []
    return [int(p) for p in body.get("serving", [])]


async def owners(workers: Sequence[Worker | None]) -> dict[int, int]:
    """Shard -> the index of the worker serving it, for the workers that answer (None
    stands for one known to be down). A shard two workers claim (a zombie that has not
    learnt it lost it) goes to the later one."""
    found = await asyncio.gather(*(serving(w) for w in workers if w is not None))
    indexes = [n for n, w in enumerate(workers) if w is not None]
    return {shard: n for n, shards in zip(indexes, found, strict=True) for shard in shards}
