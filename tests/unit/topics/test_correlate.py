"""The one result correlator (topics.correlate): a result answers the record its
`tally-source` header names, once, whether it is read before or after the broker's
acknowledgement, and never the record of another send of the same command id. Also the
ingress's `Prefer: wait` waiter built on it."""

from __future__ import annotations

import asyncio
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ingress.results import Waiter
from topics.correlate import Correlator
from topics.schema import Result, Status, source


def result(account: str = "alice", command_id: str = "c1", status: str = "applied") -> Result:
    return Result(command_id=command_id, account=account, kind="deposit", status=Status(status),
                  at_ms=1)  # fmt: skip


def test_only_the_result_naming_the_record_counts_after_the_acknowledgement() -> None:
    got: list[Result] = []
    c = Correlator()
    a = c.expect("alice", "c1", got.append)
    a.produced(3, 40)
    c.offer(result(), source(3, 12))  # another send of the same id (an earlier run)
    c.offer(result(), None)  # a result with no header names no record
    c.offer(result("bob"), source(3, 40))  # another account's command of the same id
    assert got == [] and len(c) == 1
    c.offer(result(status="duplicate"), source(3, 40))
    assert [r.status for r in got] == [Status.DUPLICATE] and len(c) == 0
    c.offer(result(), source(3, 40))  # read again (a reader restarted): answered once
    assert len(got) == 1


def test_a_result_read_before_the_acknowledgement_is_kept_for_it() -> None:
    got: list[Result] = []
    c = Correlator()
    a = c.expect("alice", "c1", got.append)
    c.offer(result(status="duplicate"), source(1, 7))
    c.offer(result(), source(1, 8))
    assert got == [] and len(c) == 1
    a.produced(1, 8)
    assert [r.status for r in got] == [Status.APPLIED] and len(c) == 0 and a.early == []


def test_two_sends_of_one_id_each_get_their_own_result() -> None:
    got: dict[str, Result] = {}
    c = Correlator()
    first = c.expect("alice", "c1", lambda r: got.setdefault("first", r))
    second = c.expect("alice", "c1", lambda r: got.setdefault("second", r))
    second.produced(0, 6)
    c.offer(result(status="applied"), source(0, 5))
    c.offer(result(status="duplicate"), source(0, 6))
    first.produced(0, 5)
    assert got["first"].status is Status.APPLIED and got["second"].status is Status.DUPLICATE


def test_forgetting_stops_the_wait_and_forgetting_twice_is_harmless() -> None:
    got: list[Result] = []
    c = Correlator()
    a = c.expect("alice", "c1", got.append)
    assert c.waits_on(b"alice") and c.awaits("alice", "c1") and not c.waits_on(None)
    c.forget(a)
    c.forget(a)
    assert len(c) == 0 and not c.waits_on(b"alice") and not c.awaits("alice", "c1")
    a.produced(0, 1)
    c.offer(result(), source(0, 1))
    assert got == []


SENDS = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["x", "y"])),
                 min_size=1, max_size=12)  # fmt: skip


@settings(max_examples=200, deadline=None, database=None)
@given(SENDS, st.randoms(use_true_random=False))
def test_every_record_gets_exactly_its_own_result_in_any_order(
    sends: list[tuple[str, str]], rnd: random.Random
) -> None:
    """Records (some with the same account and id), their acknowledgements and their
    results (and copies of other records' results) arrive in any interleaving."""
    c = Correlator()
    got: dict[int, list[bytes | None]] = {}
    places = {i: source(0, i) for i in range(len(sends))}
    steps: list[tuple[str, int]] = []
    awaited = []
    for i, (account, command_id) in enumerate(sends):
        got[i] = []

        def answered(r: Result, i: int = i) -> None:
            got[i].append(r.metadata["place"].encode() if r.metadata else None)

        awaited.append(c.expect(account, command_id, answered))
        steps += [("ack", i), ("result", i)]
    rnd.shuffle(steps)
    for step, i in steps:
        if step == "ack":
            place = places[i]
            awaited[i].produced(0, int(place.split(b":")[1]))
        else:
            account, command_id = sends[i]
            r = Result(command_id=command_id, account=account, kind="deposit",
                       status=Status.APPLIED, at_ms=1,
                       metadata={"place": places[i].decode()})  # fmt: skip
            c.offer(r, places[i])
            c.offer(r, places[i])  # read twice
    assert got == {i: [places[i]] for i in range(len(sends))}
    assert len(c) == 0


async def test_the_ingress_waiter_resolves_with_its_own_result() -> None:
    c = Correlator()
    waiter = Waiter(c, "alice", "c1")
    other = Waiter(c, "alice", "c1")
    c.offer(result(status="applied"), source(2, 9))
    waiter.produced(2, 9)
    other.produced(2, 10)
    assert (await asyncio.wait_for(waiter.future, 1)).status is Status.APPLIED
    assert not other.future.done()
    c.offer(result(status="duplicate"), source(2, 10))
    assert (await asyncio.wait_for(other.future, 1)).status is Status.DUPLICATE
    assert len(c) == 0
