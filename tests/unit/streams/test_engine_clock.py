"""The engine's time: its own clock, never a record's timestamp, and never backwards
within a shard."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from core.settings import Settings
from streams.engine import Engine
from streams.records import Output
from streams.store import ShardStore
from topics.codec import decode_result, encode
from topics.schema import Deposit, Hold
from topics.shard import shard_of


def _engine(now_s: list[float]) -> Engine:
    return Engine(Settings(partitions=1), clock=lambda: now_s[0])


def test_a_shard_time_holds_still_when_the_clock_goes_back() -> None:
    now = [1000.0]
    engine = _engine(now)
    assert engine._time_ms(0) == 1_000_000
    now[0] = 990.0  # stepped back (NTP)
    assert engine._time_ms(0) == 1_000_000
    assert engine._time_ms(1) == 990_000  # another shard has its own
    now[0] = 1001.5
    assert engine._time_ms(0) == 1_001_500


def test_records_are_decided_at_the_engine_time_not_their_timestamp(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    engine = _engine(now)
    store = ShardStore(tmp_path / "shard-0", "cl")
    try:
        out: list[Output] = []
        account = "alice"
        assert shard_of(account, 1) == 0
        commands = [
            Deposit(command_id="d1", account=account, asset="USD", amount=5),
            # Expires a second before the engine's time: refused, whatever the record says.
            Hold(
                command_id="h1",
                account=account,
                hold_id="h",
                asset="USD",
                amount=1,
                expires_at_ms=1_700_000_000_000 - 1000,
            ),
        ]
        for offset, (c, stamp) in enumerate(zip(commands, (2**62, 0), strict=True)):
            record = SimpleNamespace(
                topic=engine.topics.commands.name,
                partition=0,
                offset=offset,
                key=account.encode(),
                value=encode(c),
                timestamp=stamp,
                headers=(),
            )
            engine.records.handle(0, store, record, engine._time_ms(0), out)
        results = [decode_result(value) for topic, _, value, _, _ in out if value is not None]
        assert [r.at_ms for r in results] == [1_700_000_000_000, 1_700_000_000_000]
        assert [(r.status.value, r.reason) for r in results][1][1] == "hold_expired"
        record = store.command(account, "d1")
        assert record is not None and record.at_ms == 1_700_000_000_000
    finally:
        store.close()


def test_pruning_waits_for_a_fresh_check_that_the_clock_agrees_with_the_broker() -> None:
    engine = _engine([1000.0])
    now = 50.0  # monotonic
    assert not engine._clock_agrees(now)  # never checked
    broker = SimpleNamespace(timestamp=1_000_000 - 500, timestamp_type=1)
    engine._check_clock(1_000_000, broker)
    engine._clock_checked = now
    assert engine.clock_skew_ms == 500 and engine._clock_agrees(now)
    assert not engine._clock_agrees(now + 61)  # stale
    # A year ahead of the broker: pruning pauses, said once.
    engine._check_clock(1_000_000 + 365 * 86_400_000, broker)
    engine._check_clock(1_000_000 + 365 * 86_400_000, broker)
    engine._clock_checked = now
    assert not engine._clock_agrees(now) and engine.counts["clock_skewed"] == 1
    # A CreateTime answer is our own producer's stamp: it tells nothing.
    engine._check_clock(1_000_000, SimpleNamespace(timestamp=0, timestamp_type=0))
    assert not engine._clock_agrees(now)


def test_a_forwarded_copy_names_the_record_it_copies_not_a_header_it_carried(
    tmp_path: Path,
) -> None:
    """A record on a wrong partition is never one of the engine's copies, so a
    tally-source header on it (a producer's invention) is replaced by the record's own
    place: the result of the copy then names the record the client produced."""
    engine = Engine(Settings(partitions=4), clock=lambda: 1_700_000_000.0)
    store = ShardStore(tmp_path / "shard", "cl")
    try:
        account = "eve"
        owner = shard_of(account, 4)
        wrong = (owner + 1) % 4
        forged = owner if (owner + 2) % 4 == wrong else (owner + 2) % 4
        record = SimpleNamespace(
            topic=engine.topics.commands.name,
            partition=wrong,
            offset=17,
            key=account.encode(),
            value=encode(Deposit(command_id="f1", account=account, asset="USD", amount=5)),
            timestamp=0,
            headers=[("tally-source", b"%d:5" % forged)],
        )
        out: list[Output] = []
        engine.records.handle(wrong, store, record, engine._time_ms(wrong), out)
        ((topic, _, _, partition, headers),) = out
        assert (topic, partition) == (engine.topics.commands.name, owner)
        assert headers == [("tally-source", b"%d:17" % wrong)]
    finally:
        store.close()
