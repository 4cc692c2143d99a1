"""The sticky placement of shards over an engine group's members (`streams.placement`):
balanced, deterministic, moving only what must move, moved shards to warm holders, and
standby copies spread and never on the owner; and the assignor carrying it end to end."""

from __future__ import annotations

from typing import Any

import msgspec
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from hypothesis import given
from hypothesis import strategies as st

from core.settings import Settings
from streams.agreement import AgreeingAssignor, Verdict, terms
from streams.placement import Claim, Placement, place

names_st = st.lists(
    st.text("abcdefgh", min_size=1, max_size=4), min_size=1, max_size=6, unique=True
)
shards_st = st.integers(1, 64)


def _claims(names: list[str], shards: int, data: st.DataObject) -> dict[str, Claim]:
    subsets = st.frozensets(st.integers(-2, shards + 2), max_size=shards)
    return {n: Claim(owned=data.draw(subsets), warm=data.draw(subsets)) for n in names}


def _as_claims(p: Placement) -> dict[str, Claim]:
    return {m: Claim(owned=frozenset(p.owners[m]), warm=frozenset(p.standbys[m])) for m in p.owners}


@given(names_st, shards_st, st.integers(0, 4), st.data())
def test_every_shard_has_one_owner_and_the_loads_differ_by_at_most_one(
    names: list[str], shards: int, replicas: int, data: st.DataObject
) -> None:
    claims = _claims(names, shards, data)
    p = place(shards, claims, replicas=replicas)
    owned = sorted(s for m in p.owners for s in p.owners[m])
    assert owned == list(range(shards))
    loads = [len(v) for v in p.owners.values()]
    assert max(loads) - min(loads) <= 1
    # Deterministic: the order the members come in changes nothing.
    assert place(shards, dict(reversed(list(claims.items()))), replicas=replicas) == p


@given(names_st, shards_st, st.integers(0, 4), st.data())
def test_a_shard_s_standby_copies_are_distinct_off_its_owner_and_as_many_as_asked(
    names: list[str], shards: int, replicas: int, data: st.DataObject
) -> None:
    p = place(shards, _claims(names, shards, data), replicas=replicas)
    owner = p.owner_of()
    for s in range(shards):
        holders = [m for m in p.standbys if s in p.standbys[m]]
        assert owner[s] not in holders
        assert len(holders) == len(set(holders)) == min(replicas, len(names) - 1)


@given(names_st, shards_st, st.integers(0, 3))
def test_copies_spread_over_the_members_when_none_holds_anything_yet(
    names: list[str], shards: int, replicas: int
) -> None:
    p = place(shards, dict.fromkeys(names, Claim()), replicas=replicas)
    loads = [len(v) for v in p.standbys.values()]
    assert max(loads) - min(loads) <= 2
    assert sum(loads) == shards * min(replicas, len(names) - 1)


@given(names_st, shards_st, st.integers(0, 2), st.data())
def test_a_placement_claimed_back_is_kept_as_it_is(
    names: list[str], shards: int, replicas: int, data: st.DataObject
) -> None:
    """A rebalance that changes no member (a worker asked for one) moves nothing."""
    first = place(shards, _claims(names, shards, data), replicas=replicas)
    assert place(shards, _as_claims(first), replicas=replicas) == first


@given(names_st, shards_st, st.data())
def test_a_joining_member_takes_only_shards_and_the_others_keep_the_rest(
    names: list[str], shards: int, data: st.DataObject
) -> None:
    before = place(shards, dict.fromkeys(names, Claim()))
    joiner = "zz-" + data.draw(st.text("xyz", min_size=1, max_size=3))
    after = place(shards, {**_as_claims(before), joiner: Claim()})
    was, now = before.owner_of(), after.owner_of()
    moved = {s for s in range(shards) if was[s] != now[s]}
    # Only the joiner gains, and it gains only its share.
    assert all(now[s] == joiner for s in moved)
    assert len(moved) == len(after.owners[joiner])
    share = shards / (len(names) + 1)
    assert int(share) <= len(moved) <= -(-shards // (len(names) + 1))


@given(names_st.filter(lambda n: len(n) >= 2), shards_st, st.data())
def test_when_a_member_leaves_only_its_shards_move_to_their_warm_holders(
    names: list[str], shards: int, data: st.DataObject
) -> None:
    before = place(shards, dict.fromkeys(names, Claim()), replicas=1)
    leaver = data.draw(st.sampled_from(names))
    claims = _as_claims(before)
    del claims[leaver]
    after = place(shards, claims, replicas=1)
    was, now = before.owner_of(), after.owner_of()
    moved = {s for s in range(shards) if was[s] != now[s]}
    assert moved == set(before.owners[leaver])


def test_a_leaver_s_shards_go_to_the_holders_of_their_copies() -> None:
    before = place(6, dict.fromkeys("abc", Claim()), replicas=1)
    assert before.owners == {"a": [0, 1], "b": [2, 3], "c": [4, 5]}
    claims = _as_claims(before)
    del claims["c"]
    after = place(6, claims, replicas=1)
    holder = {s: m for m in "ab" for s in before.standbys[m]}
    assert {s: m for s, m in after.owner_of().items() if s in (4, 5)} == {
        4: holder[4],
        5: holder[5],
    }
    assert set(after.owners["a"]) >= {0, 1} and set(after.owners["b"]) >= {2, 3}


def test_two_members_claiming_one_shard_are_settled_the_same_on_every_leader() -> None:
    claims = {"a": Claim(owned=frozenset({0, 1})), "b": Claim(owned=frozenset({1, 2, 3}))}
    p = place(4, claims)
    assert p == place(4, dict(reversed(list(claims.items()))))
    assert sorted(p.owners["a"] + p.owners["b"]) == [0, 1, 2, 3]
    assert set(p.owners["b"]) == {2, 3} or set(p.owners["b"]) == {1, 2}


class _Cluster:
    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(6))


def _member(a: AgreeingAssignor) -> ConsumerProtocolMemberMetadata:
    return ConsumerProtocolMemberMetadata.decode(a.metadata(["t.commands", "t.internal"]).encode())


def test_the_assignor_places_by_instance_keeps_claims_and_sends_standbys() -> None:
    week = terms(Settings())
    a = AgreeingAssignor(
        week,
        started_ms=1,
        on_refused=lambda v: None,
        instance="worker-a",
        holdings=lambda: Claim(owned=frozenset({3, 4, 5})),
        replicas=1,
    )
    b = AgreeingAssignor(
        week, started_ms=2, on_refused=lambda v: None, instance="worker-b", replicas=1
    )
    members: dict[str, Any] = {"m-1": _member(a), "m-2": _member(b)}
    out = a.assign(_Cluster(), members)
    assert out == b.assign(_Cluster(), members)  # whoever leads
    # worker-a keeps what it claimed; both topics' partition p go together.
    assert out["m-1"].assignment == [("t.commands", [3, 4, 5]), ("t.internal", [3, 4, 5])]
    assert out["m-2"].assignment == [("t.commands", [0, 1, 2]), ("t.internal", [0, 1, 2])]
    b.on_assignment(out["m-2"])
    assert b.standby == frozenset({3, 4, 5}) and b.accepted
    assert msgspec.json.decode(out["m-1"].user_data, type=Verdict).standby == [0, 1, 2]
    # Member ids change at every restart; the instance keeps the placement.
    renamed: dict[str, Any] = {"m-9": members["m-1"], "m-2": members["m-2"]}
    assert a.assign(_Cluster(), renamed)["m-9"].assignment == out["m-1"].assignment


def test_a_worker_back_from_a_clean_stop_gets_the_shards_it_has_state_of() -> None:
    """b stopped cleanly, a took everything; b back with its old stores: the shards a
    sheds are b's old ones (cheap to catch up), not those b never held, nor those b
    holds only older state of (it served every shard alone for a moment at its start)."""
    claims = {
        "a": Claim(owned=frozenset(range(8))),
        "b": Claim(recent=frozenset({4, 5, 6, 7}), stored=frozenset(range(8))),
    }
    assert place(8, claims).owners == {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]}
    claims["b"] = Claim(stored=frozenset({0, 1, 2, 3}))
    p = place(8, claims)
    assert p.owners == {"a": [4, 5, 6, 7], "b": [0, 1, 2, 3]}
    # A warm copy beats local state, which beats nothing.
    claims["c"] = Claim(warm=frozenset({4}))
    assert place(9, claims).owner_of()[4] == "c"
