"""The settings every engine worker of one group must share, and the group assignor that
gives shards only to the workers that share the group's.

Why. Some settings change what the ledger decides: a worker with a 1-second
idempotency retention prunes the records of every shard it is given, and exact retries
of older commands then apply twice; a worker without transactions, or with other
bounds, decides differently from its peers. Each worker is configured on its own, so
nothing else stops one such worker from joining and changing the whole deployment.

How. Each worker publishes its `terms` (the values below) in its consumer-group member
metadata, the bytes Kafka's group protocol hands to the group leader with every join.
The leader's assignor (`AgreeingAssignor.assign`, in whichever worker Kafka made leader)
works out the group's terms and gives partitions only to the members that have exactly
them; each other member gets an empty assignment that says which setting differs, logs
it in one line and stops (`Disagreement`). The group's terms are those of the members
already accepted by a previous assignment (most of them, if they differ), or, in a group
where nobody has been accepted yet (a fresh start of every worker), those of the worker
that started first. So a worker that joins a running group never imposes its settings;
to change one, stop every worker of the group, then start them with the new value.

Why the group metadata and not a control topic: the leader decides in one place, for
one generation of the group, with every member's terms in hand, so there is no race
between workers writing and reading a topic, and nothing to clean up. The cost: the
group's terms live only as long as one of its workers does (a group stopped entirely
takes the settings of the next worker to start first).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

from core.settings import Settings, env_name
from streams.placement import Claim, place
from streams.store import CHANGELOG_FORMAT
from topics import limits
from topics.schema import SCHEMA_VERSION

# The settings that change a decision of the ledger (or where it is made), in the order
# a difference is reported. Not here: ports, hosts, data directories, standby replicas,
# log level and sink or ingress settings, which change no outcome.
AGREED_SETTINGS: tuple[str, ...] = (
    "partitions",  # which shard owns an account
    "processing_guarantee",  # whether a batch's effects are atomic
    "idempotency_retention_s",  # how long a command_id is a duplicate
)


class Disagreement(RuntimeError):
    """This worker's settings differ from its group's: it took no shard and stops."""


def terms(settings: Settings) -> dict[str, str]:
    """The values a worker must share with its group, by the name an operator sets
    (the TALLY_* variable) or, for the built-in bounds, the constant's name."""
    agreed = {env_name(name): str(getattr(settings, name)) for name in AGREED_SETTINGS}
    return {
        **agreed,
        # Built in, not configured: two versions of Tally with other bounds or another
        # schema decide differently, so a rolling upgrade that changes them is refused
        # too (stop the group, then start the new version).
        "SCHEMA_VERSION": str(SCHEMA_VERSION),
        "AMOUNT_MAX": str(limits.AMOUNT_MAX),
        "BALANCE_MIN": str(limits.BALANCE_MIN),
        "DISBURSE_LEGS_MAX": str(limits.DISBURSE_LEGS_MAX),
        "ACCOUNT_ASSETS_MAX": str(limits.ACCOUNT_ASSETS_MAX),
        "COMMAND_BYTES_MAX": str(limits.COMMAND_BYTES_MAX),
        # How a shard's changelog is laid out: a worker reading another layout would
        # lose idempotency records (see `streams.store`).
        "CHANGELOG_FORMAT": str(CHANGELOG_FORMAT),
    }


class Proposal(msgspec.Struct, frozen=True, kw_only=True):
    """What a member publishes when it joins: its terms, when it started (epoch ms),
    whether a previous assignment accepted it, and what the sticky placement needs (see
    `streams.placement`): its stable name (the group instance id) and its claim (the
    shards it owns, holds warm copies of, owned when its last run stopped, has local
    state of). A worker of a version before the placement publishes neither: it is
    placed by member id and claims nothing."""

    terms: dict[str, str]
    started_ms: int
    accepted: bool = False
    instance: str = ""
    claim: Claim = Claim()


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """What the leader tells a member with its assignment. `setting` is None when the
    member agrees; otherwise the first setting that differs, with both values."""

    setting: str | None = None
    mine: str | None = None
    group: str | None = None
    # The shards this member keeps warm standby copies of (TALLY_TABLE_STANDBY_REPLICAS).
    standby: list[int] = []


def read_proposal(user_data: bytes) -> Proposal | None:
    """A member's proposal, or None when it has none (a worker of an older version, or
    bytes that are not one): such a member is refused."""
    try:
        return msgspec.json.decode(user_data, type=Proposal)
    except msgspec.MsgspecError:
        return None


def group_terms(proposals: Mapping[str, Proposal]) -> dict[str, str] | None:
    """The group's terms: the most common among accepted members (ties: the one of the
    earliest started), else those of the member that started first."""
    if not proposals:
        return None
    oldest_first = sorted(proposals, key=lambda m: (proposals[m].started_ms, m))
    accepted = [m for m in oldest_first if proposals[m].accepted]
    if not accepted:
        return dict(proposals[oldest_first[0]].terms)
    counts = Counter(_frozen(proposals[m].terms) for m in accepted)
    best = max(counts.values())
    for m in accepted:  # oldest first: the earliest holder of a most common set
        if counts[_frozen(proposals[m].terms)] == best:
            return dict(proposals[m].terms)
    raise AssertionError("unreachable: an accepted member holds a most common set")


def verdict(mine: Proposal | None, group: Mapping[str, str]) -> Verdict:
    """Whether a member with proposal `mine` agrees with the group's terms."""
    if mine is None:
        return Verdict(setting="settings agreement", mine="absent", group="present")
    for key in [*group, *(k for k in mine.terms if k not in group)]:
        if mine.terms.get(key) != group.get(key):
            return Verdict(
                setting=key,
                mine=mine.terms.get(key, "absent"),
                group=group.get(key, "absent"),
            )
    return Verdict()


def refusal(v: Verdict, group_id: str) -> str:
    """The one log line of a refused worker."""
    return (
        f"this worker takes no shard: {v.setting} is {v.mine} here but {v.group} in the "
        f"group {group_id}. Every worker of a group must agree on "
        f"{', '.join(env_name(n) for n in AGREED_SETTINGS)} and the built-in bounds; start "
        "it with the group's value, or stop every worker of the group to change it"
    )


def _frozen(t: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(t.items()))


class AgreeingAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """Sticky shard placement (`streams.placement`: partition p of every topic to one
    member, since p is one shard) over the members that agree with the group's terms;
    an empty assignment, with the reason, to every other member. Each agreeing member's
    assignment also carries its standby shards. `on_refused` is called in a refused
    member with its verdict; `holdings` says, at each join, what this worker owns and
    keeps warm."""

    # The protocol name stays "range", the one of the version before the agreement, so
    # that those workers can still join the group (and are refused: they publish no
    # terms). The placement is no longer Kafka's range placement.
    name = "range"
    version = 0

    def __init__(
        self,
        mine: Mapping[str, str],
        *,
        started_ms: int,
        on_refused: Callable[[Verdict], None],
        instance: str = "",
        holdings: Callable[[], Claim] = Claim,
        replicas: int = 0,
    ) -> None:
        self.mine = dict(mine)
        self.started_ms = started_ms
        self.accepted = False
        self.on_refused = on_refused
        self.instance = instance
        self.holdings = holdings
        self.replicas = replicas
        # This member's standby shards, from its last assignment.
        self.standby: frozenset[int] = frozenset()

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        proposal = Proposal(
            terms=self.mine,
            started_ms=self.started_ms,
            accepted=self.accepted,
            instance=self.instance,
            claim=self.holdings(),
        )
        return ConsumerProtocolMemberMetadata(
            self.version, list(topics), msgspec.json.encode(proposal)
        )

    def assign(
        self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        proposals = {m: read_proposal(md.user_data or b"") for m, md in members.items()}
        known = {m: p for m, p in proposals.items() if p is not None}
        group = group_terms(known) or {}
        verdicts = {m: verdict(proposals[m], group) for m in members}
        agreeing = [m for m in members if verdicts[m].setting is None]
        topics = sorted({t for m in agreeing for t in members[m].subscription})
        counts = {t: len(cluster.partitions_for_topic(t) or ()) for t in topics}
        # A member is placed by its instance id (stable across restarts) when it has
        # one, else by its member id; two members can never share one instance id (the
        # coordinator fences the older), but the member id breaks any tie anyway.
        names = {m: f"{known[m].instance or m}\0{m}" for m in agreeing}
        placement = place(
            max(counts.values(), default=0),
            {names[m]: known[m].claim for m in agreeing},
            replicas=self.replicas,
        )
        out = {}
        for m in members:
            shards = placement.owners.get(names.get(m, ""), [])
            v = verdicts[m]
            if m in names:
                v = msgspec.structs.replace(v, standby=placement.standbys[names[m]])
            out[m] = ConsumerProtocolMemberAssignment(
                self.version,
                [(t, [p for p in shards if p < counts[t]]) for t in members[m].subscription]
                if shards
                else [],
                msgspec.json.encode(v),
            )
        return out

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        try:
            v = msgspec.json.decode(assignment.user_data or b"", type=Verdict)
        except msgspec.MsgspecError:
            # A leader of the version before the agreement: it checks nothing, and
            # neither can we. Take what it gave.
            v = Verdict()
        if v.setting is None:
            self.accepted = True
            self.standby = frozenset(v.standby)
        else:
            self.standby = frozenset()
            self.on_refused(v)
