"""`streams.fetch_session` against a model of the broker's side of KIP-227: whatever the
fetcher wants, whatever is lost on the way and whenever the broker evicts the session,
each answered request fetches exactly the partitions the fetcher wanted, at the offsets
it wanted, and the client's picture of the session is the broker's."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from aiokafka.protocol.fetch import FetchRequest, FetchRequest_v4, FetchRequest_v7, FetchRequest_v11
from aiokafka.structs import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from streams import kafka_internals
from streams.fetch_session import (
    EPOCH_MAX,
    FINAL_EPOCH,
    INITIAL_EPOCH,
    NO_SESSION,
    FetchSession,
    Plan,
    next_epoch,
)

FETCH_SESSION_ID_NOT_FOUND = 70
INVALID_FETCH_SESSION_EPOCH = 71
TPS = [TopicPartition(t, p) for t in ("a", "b") for p in range(3)]


@dataclass
class Broker:
    """The broker's session cache, as KIP-227 describes it."""

    sessions: dict[int, tuple[int, dict[TopicPartition, tuple[int, int]]]] = field(
        default_factory=dict
    )
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def fetch(self, plan: Plan) -> tuple[int, int, dict[TopicPartition, tuple[int, int]]]:
        """(error code, session id, the partitions this fetch reads at their offsets)."""
        sent = {tp: (offset, max_bytes) for tp, offset, max_bytes in plan.send}
        if plan.session_id == NO_SESSION:
            if plan.epoch == INITIAL_EPOCH:
                new = next(self.ids)
                self.sessions[new] = (1, dict(sent))
                return 0, new, sent
            assert plan.epoch == FINAL_EPOCH and not plan.forget
            return 0, NO_SESSION, sent
        if plan.session_id not in self.sessions:
            return FETCH_SESSION_ID_NOT_FOUND, NO_SESSION, {}
        expected, partitions = self.sessions[plan.session_id]
        if plan.epoch != expected:
            return INVALID_FETCH_SESSION_EPOCH, NO_SESSION, {}
        for tp in plan.forget:
            partitions.pop(tp, None)
        partitions.update(sent)
        self.sessions[plan.session_id] = (next_epoch(expected), partitions)
        return 0, plan.session_id, dict(partitions)


wanted_sets = st.dictionaries(st.sampled_from(TPS), st.integers(0, 3), max_size=len(TPS))
outcomes = st.sampled_from(["answered", "answered", "answered", "lost", "unanswered", "evicted"])


@given(st.lists(st.tuples(wanted_sets, outcomes), max_size=40))
def test_every_answered_fetch_reads_what_the_fetcher_wanted(
    steps: list[tuple[dict[TopicPartition, int], str]],
) -> None:
    """`lost`: the request never reached the broker; `unanswered`: the broker applied it
    but its answer was lost; `evicted`: the broker dropped the session first."""
    broker, session = Broker(), FetchSession()
    for wanted, outcome in steps:
        if outcome == "evicted":
            broker.sessions.clear()
        plan = session.plan([(tp, offset, 1024) for tp, offset in wanted.items()])
        if outcome == "lost":
            session.failed(plan)
            continue
        error, session_id, fetched = broker.fetch(plan)
        if outcome == "unanswered":
            session.failed(plan)
            continue
        session.answered(plan, error, session_id)
        if error:
            assert session.id == NO_SESSION and not session.partitions
            continue
        assert fetched == {tp: (offset, 1024) for tp, offset in wanted.items()}
        if session.id != NO_SESSION:
            assert session.partitions == broker.sessions[session.id][1]
            assert session.epoch == broker.sessions[session.id][0]


def test_after_the_first_fetch_only_moved_and_new_partitions_are_listed() -> None:
    a0, a1, b0 = TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 0)
    session = FetchSession()
    first = session.plan([(a0, 5, 9), (a1, 7, 9)])
    assert (first.session_id, first.epoch, first.forget) == (NO_SESSION, INITIAL_EPOCH, [])
    assert len(first.send) == 2
    session.answered(first, 0, 42)
    second = session.plan([(a0, 5, 9), (a1, 8, 9), (b0, 0, 9)])
    assert (second.session_id, second.epoch) == (42, 1)
    assert second.send == [(a1, 8, 9), (b0, 0, 9)] and second.forget == []
    session.answered(second, 0, 42)
    third = session.plan([(b0, 0, 9)])  # a0 and a1 buffered, or revoked
    assert (third.epoch, third.send, sorted(third.forget)) == (2, [], [a0, a1])
    session.answered(third, 0, 42)
    assert session.partitions == {b0: (0, 9)}


def test_a_broker_that_makes_no_session_gets_full_fetches() -> None:
    session = FetchSession()
    for _ in range(3):
        plan = session.plan([(TPS[0], 1, 9)])
        assert (plan.session_id, plan.epoch) == (NO_SESSION, INITIAL_EPOCH)
        assert plan.send == [(TPS[0], 1, 9)]
        session.answered(plan, 0, NO_SESSION)


def test_a_second_request_while_one_is_unanswered_is_outside_the_session() -> None:
    session = FetchSession()
    first = session.plan([(TPS[0], 1, 9)])
    second = session.plan([(TPS[0], 1, 9), (TPS[1], 2, 9)])
    assert (second.session_id, second.epoch, len(second.send)) == (NO_SESSION, FINAL_EPOCH, 2)
    session.answered(second, 0, NO_SESSION)  # changes nothing
    session.answered(first, 0, 7)
    assert (session.id, session.epoch, session.partitions) == (7, 1, {TPS[0]: (1, 9)})


@pytest.mark.parametrize("error", [FETCH_SESSION_ID_NOT_FOUND, INVALID_FETCH_SESSION_EPOCH, 1])
def test_an_error_answer_ends_the_session(error: int) -> None:
    session = FetchSession()
    first = session.plan([(TPS[0], 1, 9)])
    session.answered(first, 0, 7)
    session.answered(session.plan([(TPS[0], 2, 9)]), error, NO_SESSION)
    assert (session.id, session.epoch, session.partitions, session.ended) == (0, 0, {}, 1)
    assert session.plan([(TPS[0], 2, 9)]).epoch == INITIAL_EPOCH


def test_the_epoch_wraps_to_one() -> None:
    assert next_epoch(INITIAL_EPOCH) == 1
    assert next_epoch(EPOCH_MAX - 1) == EPOCH_MAX
    assert next_epoch(EPOCH_MAX) == 1


def _asked() -> FetchRequest:
    return FetchRequest(
        100, 1, 1 << 20, 1, [("a", [(0, 5, 9), (1, 7, 9)]), ("b", [(0, 3, 9)])], rack_id="r"
    )


def test_a_session_request_is_a_fetch_request_aiokafka_can_build() -> None:
    """SessionFetchRequest keeps FetchRequest's versions (v7+ carry sessions)."""
    assert kafka_internals.SessionFetchRequest._CLASSES == FetchRequest._CLASSES


def test_a_session_request_lists_only_the_plan_on_the_wire() -> None:
    session = FetchSession()
    request = kafka_internals.SessionFetchRequest(_asked(), session)
    full = request.build(FetchRequest_v11)
    assert (full.session_id, full.session_epoch) == (NO_SESSION, INITIAL_EPOCH)
    assert sum(len(p) for _, p in full.topics) == 3 and full.rack_id == "r"
    assert request.plan is not None
    session.answered(request.plan, 0, 11)
    moved = FetchRequest(100, 1, 1 << 20, 1, [("a", [(0, 6, 9)]), ("b", [(0, 3, 9)])], rack_id="r")
    request = kafka_internals.SessionFetchRequest(moved, session)
    built = request.build(FetchRequest_v11)
    assert (built.session_id, built.session_epoch) == (11, 1)
    assert built.topics == [("a", [(0, -1, 6, -1, 9)])]
    assert built.forgotten_topics_data == [("a", [1])]
    # The fetcher matches the answer against everything it asked for.
    assert request.topics == moved.topics
    v7 = kafka_internals.SessionFetchRequest(_asked(), FetchSession()).build(FetchRequest_v7)
    assert v7.topics[0] == ("a", [(0, 5, -1, 9), (1, 7, -1, 9)])


def test_before_v7_a_session_request_is_the_plain_full_fetch() -> None:
    session = FetchSession()
    request = kafka_internals.SessionFetchRequest(_asked(), session)
    assert request.build(FetchRequest_v4).topics == _asked().build(FetchRequest_v4).topics
    assert request.plan is None and session.plan([]).epoch == INITIAL_EPOCH


class _Client:
    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.cluster = "the cluster"

    async def send(self, node_id: int, request: object, **kwargs: object) -> object:
        if isinstance(request, kafka_internals.SessionFetchRequest):
            request.build(FetchRequest_v11)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


@dataclass
class _Answer:
    error_code: int
    session_id: int


async def test_the_session_client_tells_the_session_of_answers_and_failures() -> None:
    session = FetchSession()
    client = kafka_internals._SessionClient(_Client(_Answer(0, 5)))  # type: ignore[arg-type]
    assert client.cluster == "the cluster"
    await client.send(0, kafka_internals.SessionFetchRequest(_asked(), session))
    assert (session.id, session.epoch) == (5, 1)
    client._client = _Client(ConnectionError("gone"))  # type: ignore[assignment]
    with pytest.raises(ConnectionError):
        await client.send(0, kafka_internals.SessionFetchRequest(_asked(), session))
    assert (session.id, session.ended) == (NO_SESSION, 1)
    client._client = _Client("its answer")  # type: ignore[assignment]
    assert await client.send(0, "another request") == "its answer"
    assert (session.id, session.ended, session.full_requests) == (NO_SESSION, 1, 1)
