"""The settings agreement of an engine group: who sets the group's terms, who is refused
and with which line, and the assignor end to end over member metadata bytes."""

from __future__ import annotations

from typing import Any

import msgspec
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from hypothesis import given
from hypothesis import strategies as st

from core.settings import Settings
from streams.agreement import (
    AgreeingAssignor,
    Proposal,
    Verdict,
    group_terms,
    read_proposal,
    refusal,
    terms,
    verdict,
)

WEEK = terms(Settings())
SECOND = terms(Settings(idempotency_retention_s=1))


class _Cluster:
    """What RangePartitionAssignor asks of the cluster: the partitions of a topic."""

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1, 2, 3}


def test_terms_name_every_agreed_setting_by_its_variable() -> None:
    assert WEEK["TALLY_IDEMPOTENCY_RETENTION_S"] == "604800"
    assert WEEK["TALLY_PARTITIONS"] == "8"
    assert WEEK["TALLY_PROCESSING_GUARANTEE"] == "exactly_once"
    assert {"AMOUNT_MAX", "BALANCE_MIN", "SCHEMA_VERSION"} <= set(WEEK)
    # Settings that change no decision are not part of it.
    assert terms(Settings(web_port=7000, data_dir="/x", log_level="DEBUG")) == WEEK


def test_accepted_members_set_the_group_terms_whoever_started_first() -> None:
    proposals = {
        "late-good": Proposal(terms=WEEK, started_ms=200, accepted=True),
        "early-bad": Proposal(terms=SECOND, started_ms=100),
    }
    assert group_terms(proposals) == WEEK


def test_in_a_fresh_group_the_first_started_sets_the_terms() -> None:
    proposals = {
        "b": Proposal(terms=SECOND, started_ms=300),
        "a": Proposal(terms=WEEK, started_ms=100),
    }
    assert group_terms(proposals) == WEEK
    assert group_terms({}) is None


def test_the_most_common_accepted_terms_win() -> None:
    proposals = {
        "x": Proposal(terms=SECOND, started_ms=1, accepted=True),
        "y": Proposal(terms=WEEK, started_ms=2, accepted=True),
        "z": Proposal(terms=WEEK, started_ms=3, accepted=True),
    }
    assert group_terms(proposals) == WEEK


def test_a_differing_member_is_told_which_setting_and_both_values() -> None:
    v = verdict(Proposal(terms=SECOND, started_ms=0), WEEK)
    assert (v.setting, v.mine, v.group) == ("TALLY_IDEMPOTENCY_RETENTION_S", "1", "604800")
    line = refusal(v, "tally-engine")
    assert "TALLY_IDEMPOTENCY_RETENTION_S is 1 here but 604800 in the group tally-engine" in line
    assert verdict(Proposal(terms=WEEK, started_ms=0), WEEK) == Verdict()
    # A member of an older version publishes nothing: refused, never trusted.
    assert verdict(None, WEEK).setting is not None
    assert verdict(Proposal(terms={**WEEK, "NEW": "1"}, started_ms=0), WEEK).setting == "NEW"
    assert read_proposal(b"") is None and read_proposal(b"\xff{garbage") is None


def _member(assignor: AgreeingAssignor) -> ConsumerProtocolMemberMetadata:
    raw = assignor.metadata(["t.commands", "t.internal"])
    return ConsumerProtocolMemberMetadata.decode(raw.encode())


def test_the_assignor_gives_shards_only_to_agreeing_members() -> None:
    refused: list[Verdict] = []
    good = AgreeingAssignor(WEEK, started_ms=100, on_refused=refused.append)
    good.accepted = True
    bad = AgreeingAssignor(SECOND, started_ms=50, on_refused=refused.append)
    legacy = ConsumerProtocolMemberMetadata(0, ["t.commands", "t.internal"], b"")
    members: dict[str, Any] = {"m-good": _member(good), "m-bad": _member(bad), "m-old": legacy}
    # Whichever member leads, the result is the same.
    for leader in (good, bad):
        out = leader.assign(_Cluster(), members)
        assert sorted(out["m-good"].partitions()) == sorted(
            (t, p) for t in ("t.commands", "t.internal") for p in range(4)
        )
        assert out["m-bad"].partitions() == [] and out["m-old"].partitions() == []
    bad.on_assignment(out["m-bad"])
    good.on_assignment(out["m-good"])
    assert [v.setting for v in refused] == ["TALLY_IDEMPOTENCY_RETENTION_S"]
    assert good.accepted and not bad.accepted
    # The verdict travels as JSON in the assignment's user data.
    assert msgspec.json.decode(out["m-bad"].user_data, type=Verdict).mine == "1"


proposals_st = st.dictionaries(
    st.text("abcdef", min_size=1, max_size=3),
    st.builds(
        Proposal,
        terms=st.sampled_from([WEEK, SECOND, terms(Settings(partitions=4))]),
        started_ms=st.integers(0, 5),
        accepted=st.booleans(),
    ),
    max_size=6,
)


@given(proposals_st)
def test_the_group_terms_are_a_member_s_and_an_accepted_majority_keeps_them(
    proposals: dict[str, Proposal],
) -> None:
    group = group_terms(proposals)
    if not proposals:
        assert group is None
        return
    assert group in [p.terms for p in proposals.values()]
    accepted = [p.terms for p in proposals.values() if p.accepted]
    if accepted:
        # A joiner that was never accepted never decides, however early it started.
        assert group in accepted
        if any(accepted.count(t) * 2 > len(accepted) for t in accepted):
            assert accepted.count(group) * 2 > len(accepted)
    # Whoever leads, every member gets the same verdict.
    assert all(verdict(p, group or {}).setting is None for p in proposals.values()
               if p.terms == group)  # fmt: skip
