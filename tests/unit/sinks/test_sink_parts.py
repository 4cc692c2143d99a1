"""Pure parts of the sinks: migration file discovery, the Redis key layout, and how the
batch loop isolates an event the store refuses (over a store of its own)."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError as RedisDataError
from redis.exceptions import ReadOnlyError, ResponseError

from sinks.migrate import MigrationError, files
from sinks.pg import quote
from sinks.redis_store import assets_key, balance_key
from sinks.runner import Batch, SinkRunner
from sinks.service import postgres_content_error, redis_content_error
from topics.schema import Result, Status
from topics.shard import shard_of
from topics.specs import topics_for


def test_the_shipped_migrations_are_numbered_from_one() -> None:
    found = files()
    assert [v for v, _, _ in found] == list(range(1, len(found) + 1))
    assert found[0][1] == "projections"


@pytest.mark.parametrize(
    ("names", "error"),
    [
        (["0001_a.sql", "0003_c.sql"], "without gaps"),
        (["0001_a.sql", "0001_b.sql"], "without gaps"),
        (["1_a.sql"], "NNNN_name.sql"),
        (["0001_Bad-Name.sql"], "NNNN_name.sql"),
    ],
)
def test_bad_migration_folders_are_refused(tmp_path: Path, names: list[str], error: str) -> None:
    for name in names:
        (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=error):
        files(tmp_path)


def test_identifiers_are_quoted_safely() -> None:
    assert quote("demo-1") == '"demo-1"'
    assert quote('a"b') == '"a""b"'


def test_redis_keys_of_one_account_share_the_shard_hash_tag() -> None:
    shard = shard_of("alice", 8)
    key = balance_key("tally", shard, "alice", "USD")
    assert key == f"tally:{{{shard}}}:balance:alice:USD"
    assert assets_key("tally", shard, "alice") == f"tally:{{{shard}}}:assets:alice"
    # Redis Cluster hashes only what is inside the first {...}: the shard id.
    assert key[key.index("{") + 1 : key.index("}")] == str(shard)


class _Poison(Exception):
    """What the fake store raises for an event whose command_id says "poison"."""


class _FakeStore:
    """A store that keeps what it was given and refuses any batch with a poison event,
    like PostgreSQL refusing a value: nothing of that batch is kept."""

    name = "fake"
    unavailable: tuple[type[BaseException], ...] = (ConnectionError,)

    def __init__(self) -> None:
        self.events: list[str] = []
        self.stored: dict[int, int] = {}
        self.writes = 0

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def offsets(self, topic: str) -> dict[int, int]:
        return dict(self.stored)

    async def write(self, batch: Batch) -> None:
        self.writes += 1
        if any(r.command_id.startswith("poison") for _, r in batch.events):
            raise _Poison("value out of range")
        for _, r in batch.events:
            if r.command_id not in self.events:
                self.events.append(r.command_id)
        self.stored.update(batch.offsets)


def _event(command_id: str) -> Result:
    return Result(
        command_id=command_id, account="a", kind="deposit", status=Status.APPLIED, at_ms=1
    )


@pytest.mark.parametrize(
    "ids",
    [
        ["poison"],
        ["a", "poison"],
        ["poison", "a", "b"],
        ["a", "b", "poison-1", "c", "d", "e", "poison-2", "f"],
        [f"e{i}" for i in range(37)] + ["poison"] + [f"f{i}" for i in range(20)],
    ],
)
async def test_a_refused_event_is_isolated_and_the_rest_written_in_order(ids: list[str]) -> None:
    store = _FakeStore()
    runner = SinkRunner(
        store,  # type: ignore[arg-type]
        bootstrap="127.0.0.1:1",
        topics=topics_for("t", 2),
        group_id=None,
        partitions=[0, 1],
        until={0: 100, 1: 100},  # a replay: dead letters are counted, not sent
        content_error=lambda e: isinstance(e, _Poison),
    )
    events = [(i % 2, _event(c)) for i, c in enumerate(ids)]
    batch = Batch(
        topic="t.events",
        events=events,
        sources=list(range(10, 10 + len(ids))),
        offsets={0: 90, 1: 91},
        start={0: 5, 1: 6},
    )
    await runner._write(batch)
    good = [c for c in ids if not c.startswith("poison")]
    assert store.events == good  # in the batch's order
    assert store.stored == {0: 90, 1: 91}  # moved once, at the end
    assert runner.isolated == runner.dead_lettered == len(ids) - len(good)
    assert runner.written_events == len(good)


async def test_an_outage_during_isolation_is_waited_out_not_dead_lettered() -> None:
    store = _FakeStore()
    failures = [ConnectionError("down"), ConnectionError("down")]
    write = store.write

    async def flaky(batch: Batch) -> None:
        if store.writes == 1 and failures:
            raise failures.pop()
        await write(batch)

    store.write = flaky  # type: ignore[method-assign]
    runner = SinkRunner(
        store,  # type: ignore[arg-type]
        bootstrap="127.0.0.1:1",
        topics=topics_for("t", 1),
        group_id=None,
        partitions=[0],
        until={0: 100},
        content_error=lambda e: isinstance(e, _Poison),
    )
    batch = Batch(
        topic="t.events",
        events=[(0, _event("a")), (0, _event("poison")), (0, _event("b"))],
        sources=[1, 2, 3],
        offsets={0: 4},
        start={0: 1},
    )
    await runner._write(batch)
    assert store.events == ["a", "b"] and store.stored == {0: 4}
    assert runner.isolated == 1 and runner.outages == 1


async def test_an_error_that_is_not_the_content_still_fails_the_write() -> None:
    class Broken(_FakeStore):
        async def write(self, batch: Batch) -> None:
            raise RuntimeError("a bug")

    runner = SinkRunner(
        Broken(),  # type: ignore[arg-type]
        bootstrap="127.0.0.1:1",
        topics=topics_for("t", 1),
        group_id=None,
        partitions=[0],
        until={0: 100},
        content_error=lambda e: isinstance(e, _Poison),
    )
    with pytest.raises(RuntimeError):
        await runner._write(Batch(topic="t.events", events=[(0, _event("a"))], sources=[0]))


def test_store_errors_of_an_event_are_told_apart_from_outages() -> None:
    pipeline = "Command # 1 (EVALSHA 24d1 3 k) of pipeline caused error: "
    assert redis_content_error(ResponseError(pipeline + "('Lua redis lib command arguments',)"))
    assert redis_content_error(ResponseError("WRONGTYPE Operation against a key"))
    assert redis_content_error(RedisDataError("Invalid input of type: 'dict'"))
    assert not redis_content_error(ResponseError(pipeline + "BUSY Redis is busy running a script"))
    assert not redis_content_error(ReadOnlyError("You can't write against a read only replica"))
    assert not redis_content_error(RedisConnectionError("Connection refused"))
    assert postgres_content_error(OverflowError("date value out of range"))
    assert postgres_content_error(asyncpg.NumericValueOutOfRangeError("bigint out of range"))
    assert postgres_content_error(asyncpg.CheckViolationError("violates check constraint"))
    assert postgres_content_error(asyncpg.CharacterNotInRepertoireError("invalid byte 0x00"))
    assert not postgres_content_error(asyncpg.PostgresConnectionError("terminated"))
    assert not postgres_content_error(asyncpg.AdminShutdownError("shutting down"))
    assert not postgres_content_error(OSError("Connection refused"))
