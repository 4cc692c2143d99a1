"""Where each shard goes: its owner and its warm standby copies, decided by the group's
leader at every rebalance. Pure and deterministic: the same members with the same claims
always get the same placement, whichever worker happens to be the leader.

Why sticky. A shard that changes owner pays a fence (the new owner's transactional
producer aborts the old owner's open transaction), a catch-up from its changelog and a
re-read of its committed offsets; a shard that stays pays nothing (see
`streams.ownership`). So the leader keeps every shard where it is, as far as balance
allows, and moves only the shards it must: those of a member that left, and the excess
of a member above its share when one joined. A moved shard goes to a member that holds
a warm standby copy of it when one has room, so that its catch-up replays only the tail
the standby had not seen.

Balance. With S shards and M members each member owns S // M or S // M + 1 of them; the
members that already own the most get the larger shares, which is what keeps movement
smallest.

Standby copies. `replicas` warm copies per shard (at most M - 1), never on the shard's
owner, preferring members that already hold the shard (as a standby or as its previous
owner), then the members with the fewest copies so far, then those with the fewest
copies of the same owner's shards: copies spread over the members (their counts differ
by at most two when nobody holds anything yet) instead of every member tailing every
shard, and an owner's shards have their copies on several members.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import msgspec


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    """What a member brings to a rebalance: the shards it owned until now (and still
    serves, if the placement lets it keep them), those it holds warm standby copies of,
    those it owned when its previous run stopped (its state of them is as fresh as a
    stop a moment ago), and those it has any local state of (older, say from a run
    long ago: cheaper to catch up than nothing)."""

    owned: frozenset[int] = frozenset()
    warm: frozenset[int] = frozenset()
    recent: frozenset[int] = frozenset()
    stored: frozenset[int] = frozenset()

    def cost(self, p: int) -> int:
        """How much taking shard p over would read here, in ranks: 0 a warm copy's tail,
        1 what happened since a recent stop, 2 since some older run, 3 all of it."""
        if p in self.warm:
            return 0
        return 1 if p in self.recent else 2 if p in self.stored else 3


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """Each member's shards and standby copies, both sorted."""

    owners: dict[str, list[int]]
    standbys: dict[str, list[int]]

    def owner_of(self) -> dict[int, str]:
        return {p: m for m, shards in self.owners.items() for p in shards}


def place(shards: int, claims: Mapping[str, Claim], *, replicas: int = 0) -> Placement:
    """Place `shards` shards (0..shards-1) over the members of `claims` (keyed by a
    stable member name: the group instance id when it has one)."""
    members = sorted(claims)
    if not members:
        return Placement(owners={}, standbys={})
    owner = _owners(shards, members, claims)
    owners: dict[str, list[int]] = {m: [] for m in members}
    for p in range(shards):
        owners[owner[p]].append(p)
    return Placement(owners=owners, standbys=_standbys(members, claims, owners, owner, replicas))


def _owners(shards: int, members: list[str], claims: Mapping[str, Claim]) -> dict[int, str]:
    def valid(m: str) -> list[int]:
        return sorted(p for p in claims[m].owned if 0 <= p < shards)

    base, extra = divmod(shards, len(members))
    by_holdings = sorted(members, key=lambda m: (-len(valid(m)), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_holdings)}
    owner: dict[int, str] = {}
    load = dict.fromkeys(members, 0)
    # Keep: each member its own shards, up to its share, first those the others would
    # find dearest to take over (a member above its share sheds the shards another
    # holds a copy or local state of). Two members claiming one shard (one of them
    # missed a generation) is settled by name, the same on every leader.
    for m in members:
        others = [claims[n] for n in members if n != m]
        cheapest = {p: min((c.cost(p) for c in others), default=3) for p in valid(m)}
        for p in sorted(cheapest, key=lambda p: (-cheapest[p], p)):
            if p not in owner and load[m] < quota[m]:
                owner[p] = m
                load[m] += 1
    # Move: the rest to members with room, the cheapest to take it over first (a warm
    # copy, then the state of a recent run, then older state), then by name (so a fresh
    # group gets contiguous ranges, as Kafka's range assignor gives).
    for p in range(shards):
        if p in owner:
            continue
        room = [m for m in members if load[m] < quota[m]]
        chosen = min(room, key=lambda m: (claims[m].cost(p), m))
        owner[p] = chosen
        load[chosen] += 1
    return owner


def _standbys(
    members: list[str],
    claims: Mapping[str, Claim],
    owners: Mapping[str, list[int]],
    owner: Mapping[int, str],
    replicas: int,
) -> dict[str, list[int]]:
    copies = max(0, min(replicas, len(members) - 1))
    standbys: dict[str, list[int]] = {m: [] for m in members}
    if copies == 0:
        return standbys
    n = len(members)
    index = {m: i for i, m in enumerate(members)}
    rank = {p: i for shards in owners.values() for i, p in enumerate(shards)}
    # How many of each owner's shards a member copies: spread too, so that when an
    # owner leaves, its shards' copies (and so its shards) are over several members.
    per_owner: Counter[tuple[str, str]] = Counter()
    # Shards taken one of each owner in turn, so that no member ends up the only one
    # with room left when its own shards come.
    for p in sorted(owner, key=lambda p: (rank[p], index[owner[p]])):
        mine = owner[p]
        ranked = sorted(
            (
                p not in claims[m].warm and p not in claims[m].owned,  # holds it already
                len(standbys[m]),
                per_owner[mine, m],
                (index[m] - index[mine] - rank[p]) % n,  # the next after the owner in turn
                m,
            )
            for m in members
            if m != mine
        )
        for *_, m in ranked[:copies]:
            standbys[m].append(p)
            per_owner[mine, m] += 1
    return {m: sorted(v) for m, v in standbys.items()}
