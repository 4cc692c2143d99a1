"""Fuzz one real engine worker with hostile records produced for real (aiokafka, and kcat
for raw bytes) between valid commands, and check after every example what the engine
promises whatever a record holds (DESIGN.md guarantee 8):

- the worker never exits;
- every valid deposit sent around the hostile records is applied exactly once;
- every record that names a command_id (a command, or one answered `rejected`) has
  exactly one result, whose tally-source names that record, even when the engine had
  to forward it from a wrong partition;
- every other record has exactly one dead letter, and no letter is larger than
  limits.DEAD_LETTER_BYTES_MAX;
- after the credits have landed: seq without gaps, events equal to the engine's tables,
  and conservation per asset.

Generated: random bytes, 0xff blobs, huge JSON (valid commands padded past the record
limit, the id first or last), deep nesting, JSON that is not an object, every command
kind with one field broken (wrong type, missing, unknown, out of range), valid commands
with a key or partition that does not match their account, and disbursements of up to
limits.DISBURSE_LEGS_MAX legs. The short form runs with the fault suite; `make fuzz`
(TALLY_FUZZ_EXAMPLES=N) runs the long one."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from core.settings import Settings
from harness import checks
from harness.collector import Collector
from harness.procs import EngineProcess
from streams.state import BalanceState
from topics import limits
from topics.codec import Undecodable, decode_command, decode_dead_letter, decode_result, encode
from topics.producer import durable_producer
from topics.schema import PUBLIC_KINDS, Deposit, Status, source, source_in

pytestmark = pytest.mark.fault

PARTITIONS = 4
# The short form: a handful of examples, well under a minute with the worker's start.
EXAMPLES = int(os.environ.get("TALLY_FUZZ_EXAMPLES", "8"))
HOSTILE_MAX = 6
ANSWER_TIMEOUT_S = 90.0

POOL = [f"fz{i}" for i in range(6)]  # accounts hostile commands may name
CLEAN = [f"ok{i}" for i in range(4)]  # accounts only the valid deposits touch
ASSETS = ["USD", "EUR"]


@dataclass(frozen=True)
class Hostile:
    """One record to produce: its key, value and partition (None: murmur2 of the key)."""

    what: str
    key: bytes | None
    value: bytes
    partition: int | None = None
    kcat: bool = False

    def __repr__(self) -> str:
        # Short: a failing example is printed, and its values can be megabytes.
        head = self.value[:80] + (b"..." if len(self.value) > 80 else b"")
        return (f"Hostile({self.what!r}, key={self.key!r}, {len(self.value)} bytes {head!r}, "
                f"partition={self.partition}, kcat={self.kcat})")  # fmt: skip


# Strategies ---------------------------------------------------------------------------

amounts = st.integers(1, 10_000)
cids = st.sampled_from(["x1", "x2", "x3"]) | st.from_regex(
    limits.COMMAND_ID_PATTERN, fullmatch=True
)


@st.composite
def command_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A valid public command of any kind, as the dict it is on the wire."""
    kind = draw(st.sampled_from(PUBLIC_KINDS))
    body: dict[str, Any] = {
        "kind": kind,
        "command_id": draw(cids),
        "account": draw(st.sampled_from(POOL)),
    }
    asset = draw(st.sampled_from(ASSETS))
    to = draw(st.sampled_from(POOL))
    if kind in ("deposit", "withdraw"):
        body |= {"asset": asset, "amount": draw(amounts)}
    elif kind == "transfer":
        body |= {"to": to, "asset": asset, "amount": draw(amounts)}
    elif kind == "disburse":
        legs = draw(st.integers(1, 4) | st.just(limits.DISBURSE_LEGS_MAX))
        body |= {"asset": asset, "legs": [{"to": to, "amount": 1} for _ in range(legs)]}
    elif kind == "hold":
        body |= {"hold_id": draw(st.sampled_from(["h1", "h2"])), "asset": asset,
                 "amount": draw(amounts)}  # fmt: skip
    elif kind == "release":
        body |= {"hold_id": draw(st.sampled_from(["h1", "h2"]))}
    elif kind == "capture":
        body |= {"hold_id": draw(st.sampled_from(["h1", "h2"]))}
        if draw(st.booleans()):
            body["to"] = to
    else:
        body |= draw(
            st.sampled_from(
                [{"status": "frozen"}, {"status": "active"}, {"status": "closed"},
                 {"asset": asset, "overdraft_limit": 50}]
            )
        )  # fmt: skip
    return body


wrong_values = st.sampled_from(
    ["5", 1.5, -1, 0, True, None, [], {}, 2**200, "x" * 300, "alice\n", "ümlaut", 2**63]
)


@st.composite
def broken_commands(draw: st.DrawFn) -> bytes:
    """A command with one field broken: a wrong value, removed, or one field too many."""
    body = draw(command_dicts())
    how = draw(st.sampled_from(["value", "missing", "unknown", "kind", "version", "legs"]))
    field = draw(st.sampled_from(sorted(body)))
    if how == "value":
        body[field] = draw(wrong_values)
    elif how == "missing":
        del body[field]
    elif how == "unknown":
        body["surprise"] = draw(wrong_values)
    elif how == "kind":
        body["kind"] = draw(st.sampled_from(["credit", "refund", "expire", "Deposit", "", "x"]))
    elif how == "version":
        body["v"] = draw(st.sampled_from([0, 2, "1", None]))
    else:
        body["legs"] = [{"to": "fz1", "amount": 1}] * (limits.DISBURSE_LEGS_MAX + 1)
    return json.dumps(body).encode()


@st.composite
def huge_commands(draw: st.DrawFn) -> bytes:
    """A valid command padded past the record limit, its id first or after the padding."""
    body = draw(command_dicts())
    size = draw(
        st.sampled_from(
            [limits.COMMAND_BYTES_MAX + 1, limits.SALVAGE_DECODE_BYTES_MAX + 10, 900 * 1024]
        )
    )
    if draw(st.booleans()):
        return json.dumps(body).encode()[:-1] + b" " * size + b"}"
    padded = {"memo": "m" * size, **body} if draw(st.booleans()) else {**body, "memo": "m" * size}
    return json.dumps(padded).encode()


def _deep(depth: int, opener: bytes, closer: bytes) -> bytes:
    return opener * depth + closer * depth


values = st.one_of(
    st.builds(lambda b: ("random bytes", b), st.binary(max_size=3000)),
    st.builds(lambda n: ("0xff blob", b"\xff" * n), st.integers(1, 300_000)),
    st.builds(lambda d: ("deep nesting", _deep(d, b"[", b"]")), st.integers(100, 200_000)),
    st.builds(
        lambda d: ("deep objects", _deep(d, b'{"a":', b"}")[:-1] + b"1}"), st.integers(100, 50_000)
    ),
    st.builds(
        lambda v: ("not an object", v),
        st.sampled_from([b"5", b'"s"', b"[]", b"null", b"true", b"", b" "]),
    ),
    st.builds(lambda v: ("broken command", v), broken_commands()),
    st.builds(lambda v: ("huge command", v), huge_commands()),
    st.builds(lambda d: ("valid command", json.dumps(d).encode()), command_dicts()),
)


@st.composite
def hostile_records(draw: st.DrawFn) -> Hostile:
    what, value = draw(values)
    keys = (
        st.sampled_from([b"fz0", b"fz3", b"ok1"]) | st.none() | st.binary(min_size=1, max_size=80)
    )
    if len(value) < 64 * 1024:
        keys |= st.builds(lambda n: b"\xfe" * n, st.integers(1000, 400_000))  # a huge key
    key = draw(keys)
    partition = draw(st.none() | st.integers(0, PARTITIONS - 1))
    raw_bytes = what in ("random bytes", "0xff blob")
    kcat = raw_bytes and draw(st.booleans()) and (key is None or key.isalnum())
    return Hostile(what, key, value, partition, kcat)


# The harness --------------------------------------------------------------------------


@dataclass
class Fuzz:
    engine: EngineProcess
    collector: Collector
    settings: Settings
    garbage: int = 0
    deposits: int = 0


@pytest.fixture(scope="module")
async def fuzz(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fuzz]:
    """One engine worker for every example, on topics of this run's own."""
    prefix = f"fuzz-{uuid.uuid4().hex[:10]}"
    engine = EngineProcess(
        settings, prefix=prefix, data_dir=tmp_path_factory.mktemp("fuzz") / "state",
        partitions=PARTITIONS,
    )  # fmt: skip
    await engine.start()
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await collector.start(from_end=False)
    try:
        yield Fuzz(engine, collector, settings)
    finally:
        await collector.stop()
        await engine.stop()


async def _ends(bootstrap: str, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def _read_from(bootstrap: str, starts: dict[TopicPartition, int]) -> list[Any]:
    """Every committed record from `starts` to the ends of now."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed",
        enable_auto_commit=False, max_partition_fetch_bytes=4 * 1024 * 1024,
    )  # fmt: skip
    await consumer.start()
    try:
        tps = list(starts)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp, offset in starts.items():
            consumer.seek(tp, offset)
        out: list[Any] = []
        deadline = time.monotonic() + 60
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            assert time.monotonic() < deadline, "reading back did not reach the end"
            polled = await consumer.getmany(timeout_ms=300, max_records=10_000)
            for tp, records in polled.items():
                out.extend(r for r in records if r.offset < ends[tp])
        return out
    finally:
        await consumer.stop()


async def _kcat(bootstrap: str, topic: str, record: Hostile, tmp: Path) -> None:
    kcat = shutil.which("kcat")
    assert kcat, "kcat is not installed: scripts/services.sh up installs it"
    path = tmp / f"kcat-{uuid.uuid4().hex}"
    path.write_bytes(record.value)
    args = [kcat, "-P", "-b", bootstrap, "-t", topic]
    if record.key is not None:
        args += ["-k", record.key.decode()]
    if record.partition is not None:
        args += ["-p", str(record.partition)]
    proc = await asyncio.create_subprocess_exec(*args, str(path), stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    path.unlink()
    assert proc.returncode == 0, err.decode()


async def _produce(fz: Fuzz, records: list[Hostile], deposits: list[Deposit], tmp: Path) -> None:
    """The first deposit, the hostile records in order, the second deposit."""
    topic = fz.engine.topics.commands.name
    producer = durable_producer(fz.settings.kafka_bootstrap, max_request_size=2 * 1024 * 1024)
    await producer.start()
    try:
        await producer.send_and_wait(topic, encode(deposits[0]), key=deposits[0].account.encode())
        for record in records:
            if record.kcat:
                await _kcat(fz.settings.kafka_bootstrap, topic, record, tmp)
            else:
                await producer.send_and_wait(
                    topic, record.value, key=record.key, partition=record.partition
                )
        await producer.send_and_wait(topic, encode(deposits[1]), key=deposits[1].account.encode())
    finally:
        await producer.stop()


def _judge(fz: Fuzz, commands: list[Any], events: list[Any], letters: list[Any]) -> list[str]:
    """What is wrong with the answers to the records of one example (empty: nothing)."""
    topic = fz.engine.topics.commands.name
    answers: dict[bytes, list[Any]] = {}
    for record in events:
        found = source_in(record.headers)
        if found is not None:
            answers.setdefault(found, []).append(decode_result(record.value))
    lettered: dict[tuple[str, int, int], int] = {}
    wrong: list[str] = []
    for record in letters:
        if len(record.value) > limits.DEAD_LETTER_BYTES_MAX:
            wrong.append(f"a dead letter of {len(record.value)} bytes")
        letter = decode_dead_letter(record.value)
        spot = (letter.source_topic, letter.source_partition, letter.source_offset)
        lettered[spot] = lettered.get(spot, 0) + 1
    clients = [r for r in commands if source_in(r.headers) is None]  # not forwarded copies
    for record in clients:
        name = source(record.partition, record.offset)
        decoded = decode_command(record.value or b"")
        got = answers.pop(name, [])
        letters_of = lettered.pop((topic, record.partition, record.offset), 0)
        if isinstance(decoded, Undecodable):
            if got or letters_of != 1:
                wrong.append(f"{name!r} ({decoded.reason[:60]}): {len(got)} results, "
                             f"{letters_of} dead letters; want 0 and 1")  # fmt: skip
        elif len(got) != 1 or got[0].command_id != decoded.command_id or letters_of:
            wrong.append(f"{name!r} ({decoded.command_id}): results {got}, {letters_of} letters")
    if answers:
        wrong.append(f"results for no record: {sorted(answers)[:3]}")
    if lettered:
        wrong.append(f"dead letters for no record: {sorted(lettered)[:3]}")
    return wrong


@given(records=st.lists(hostile_records(), min_size=1, max_size=HOSTILE_MAX), data=st.data())
# No shrinking: every example runs against the same worker, whose state the earlier
# examples changed, so a shrunk example is not the one that failed; and each failing
# attempt waits ANSWER_TIMEOUT_S. The failure message lists every record answered wrong.
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
async def test_no_record_stops_the_worker_or_goes_unanswered(
    fuzz: Fuzz, tmp_path: Path, records: list[Hostile], data: st.DataObject
) -> None:
    fz = fuzz
    topics = fz.engine.topics
    n = fz.deposits
    fz.deposits += 2
    deposits = [
        Deposit(command_id=f"ok-{n + i}", account=data.draw(st.sampled_from(CLEAN)),
                asset="USD", amount=1 + n + i)
        for i in range(2)
    ]  # fmt: skip
    starts = await _ends(
        fz.settings.kafka_bootstrap, [topics.commands.name, topics.events.name,
                                      topics.dead_letter.name]
    )  # fmt: skip
    await _produce(fz, records, deposits, tmp_path)
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while True:
        everything = await _read_from(fz.settings.kafka_bootstrap, starts)
        by_topic: dict[str, list[Any]] = {}
        for record in everything:
            by_topic.setdefault(record.topic, []).append(record)
        wrong = _judge(
            fz,
            by_topic.get(topics.commands.name, []),
            by_topic.get(topics.events.name, []),
            by_topic.get(topics.dead_letter.name, []),
        )
        done = all(len(fz.collector.results.by_id.get(d.command_id, ())) >= 1 for d in deposits)
        if (not wrong and done) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert fz.engine.proc is not None and fz.engine.proc.returncode is None, fz.engine.tail()
    assert not wrong, "\n".join(wrong[:10]) + "\n" + fz.engine.tail(20)
    for d in deposits:
        got = fz.collector.results.by_id[d.command_id]
        assert [r.status for r in got] == [Status.APPLIED], got
    fz.garbage += sum(
        isinstance(decode_command(r.value or b""), Undecodable)
        for r in by_topic.get(topics.commands.name, [])
        if source_in(r.headers) is None
    )
    await _check_the_books(fz)


async def _check_the_books(fz: Fuzz) -> None:
    """Once every credit and refund has landed: seq, tables and conservation."""
    results = fz.collector.results
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while results.pending_internal() or len(results.dead_letters) < fz.garbage:
        assert time.monotonic() < deadline, (results.pending_internal()[:5], fz.engine.tail(20))
        await asyncio.sleep(0.2)
    accounts = {e.account for rs in list(results.by_id.values()) for r in rs for e in r.entries}
    balances: dict[tuple[str, str], BalanceState] = {}
    for account in sorted(accounts):
        for asset, bal in (await fz.engine.balances(account)).items():
            balances[(account, asset)] = bal
    found = checks.run_checks(expected={}, garbage=fz.garbage, results=results, balances=balances)
    assert all(c.ok for c in found), checks.render(found)


def test_the_strategies_reach_every_kind_of_record() -> None:
    """Every family of hostile record can be drawn (a strategy that never produced, say,
    huge commands would make the fuzz test quietly weaker)."""
    seen: set[str] = set()

    @given(hostile_records())
    @settings(max_examples=300, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def draw(record: Hostile) -> None:
        seen.add(record.what)
        assert len(record.value) < 1024 * 1024  # within what a producer may send

    draw()
    assert seen == {
        "random bytes", "0xff blob", "deep nesting", "deep objects", "not an object",
        "broken command", "huge command", "valid command",
    }  # fmt: skip
