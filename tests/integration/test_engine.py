"""The engine end to end on the real broker: every command kind, cross-shard transfers and
refunds, duplicates, reused ids, dead letters, misplaced records, hold expiry, and a
restart from an empty state directory that must restore identical balances."""

from __future__ import annotations

import shutil
import time

from core.settings import Settings
from harness.collector import Collector, Results, all_answered, expected_counts
from harness.procs import EngineProcess, command, produce
from tests.integration.conftest import ENGINE_PARTITIONS
from topics.codec import encode
from topics.ids import credit_id, refund_id
from topics.schema import (
    Capture,
    Configure,
    Deposit,
    Disburse,
    Hold,
    Leg,
    Release,
    Status,
    Transfer,
    Withdraw,
)
from topics.shard import shard_of

PARTITIONS = ENGINE_PARTITIONS


def _one(results: Results, command_id: str) -> tuple[str, str | None]:
    got = results.by_id[command_id]
    assert len(got) == 1, got
    return got[0].status.value, None if got[0].reason is None else got[0].reason.value


async def test_every_kind_end_to_end_and_restart_from_changelogs(
    settings: Settings, engine: EngineProcess, unique: str
) -> None:
    a, b, c, d, e = (f"{n}-{unique}" for n in ("alice", "bob", "carol", "dave", "erin"))
    exp = int(time.time() * 1000) + 1500
    legs = [Leg(to=c, amount=10), Leg(to=d, amount=20)]
    cmds = [
        Deposit(command_id="d1", account=a, asset="USD", amount=1000),
        Transfer(command_id="t1", account=a, to=b, asset="USD", amount=300),
        Disburse(command_id="x1", account=a, asset="USD", legs=legs),
        Hold(command_id="h1", account=a, hold_id="H1", asset="USD", amount=100),
        Capture(command_id="c1", account=a, hold_id="H1", amount=40, to=b),
        Hold(command_id="h2", account=a, hold_id="H2", asset="USD", amount=50, expires_at_ms=exp),
        Hold(command_id="h3", account=a, hold_id="H3", asset="USD", amount=30),
        Release(command_id="r3", account=a, hold_id="H3"),
        Withdraw(command_id="w1", account=a, asset="USD", amount=50),
        Configure(command_id="o1", account=a, asset="USD", overdraft_limit=100),
        Withdraw(command_id="w2", account=a, asset="USD", amount=600),
        Withdraw(command_id="w3", account=a, asset="USD", amount=31),
        Configure(command_id="z1", account=e, status="closed"),
        Transfer(command_id="t2", account=a, to=e, asset="USD", amount=5),
        Deposit(command_id="d1", account=a, asset="USD", amount=1000),  # exact retry
    ]
    records = [command(x) for x in cmds]
    forged = Deposit(command_id="d1", account=a, asset="USD", amount=1)
    records.append(command(forged))  # same id, other payload
    records.append((a, b'{"kind":"deposit","command_id":"bad1","account":"x","amount":1.5}', None))
    records.append((a, b"\x00garbage", None))
    # A record on the wrong partition, as kcat's CRC32 partitioner might place it.
    wrong = (shard_of(b, PARTITIONS) + 1) % PARTITIONS
    records.append((b, encode(Deposit(command_id="m1", account=b, asset="EUR", amount=7)), wrong))

    collector = Collector(settings.kafka_bootstrap, engine.topics)
    await collector.start(from_end=False)
    try:
        await produce(settings.kafka_bootstrap, engine.topics.commands.name, records)
        ids = [r.command_id for r in cmds] + ["d1", "bad1", "m1"]
        expected = expected_counts(ids)
        internal = [
            credit_id(a, "t1"),
            credit_id(a, "x1", 0),
            credit_id(a, "x1", 1),
            credit_id(a, "c1"),
            credit_id(a, "t2"),
            refund_id(credit_id(a, "t2")),
        ]
        expected.update({i: 1 for i in internal})
        assert await collector.wait_for(
            lambda r: (
                all_answered(expected)(r)
                and any(cid.startswith("expire.") for cid in r.by_id)
                and len(r.dead_letters) >= 1
            ),
            timeout_s=60,
            say=lambda _: None,
        ), engine.tail()
        results = collector.results
    finally:
        await collector.stop()

    for cid in ("t1", "x1", "h1", "c1", "h2", "h3", "r3", "w1", "o1", "w2", "z1", "t2", "m1"):
        assert _one(results, cid) == ("applied", None), cid
    assert _one(results, "w3") == ("rejected", "insufficient_funds")
    assert _one(results, "bad1") == ("rejected", "invalid_command")
    assert [r.status for r in results.by_id["d1"]] == [
        Status.APPLIED,
        Status.DUPLICATE,
        Status.REJECTED,
    ]
    assert results.by_id["d1"][2].reason is not None
    assert results.by_id["d1"][2].reason.value == "command_id_reused"
    assert _one(results, credit_id(a, "t2")) == ("rejected", "account_closed")
    assert _one(results, refund_id(credit_id(a, "t2"))) == ("applied", None)
    expiries = [r for cid, rs in results.by_id.items() if cid.startswith("expire.") for r in rs]
    assert [(r.status, r.entries[0].held) for r in expiries] == [(Status.APPLIED, 0)]
    assert len(results.dead_letters) == 1
    assert results.dead_letters[0].raw == "\x00garbage"

    before = {x: await engine.balances(x) for x in (a, b, c, d, e)}
    assert {k: (v.available, v.held) for k, v in before[a].items()} == {"USD": (-20, 0)}
    assert {k: (v.available, v.held) for k, v in before[b].items()} == {
        "USD": (340, 0),
        "EUR": (7, 0),
    }
    assert before[c]["USD"].available == 10 and before[d]["USD"].available == 20
    assert before[e] == {}
    # Conservation: deposits 1000 + 7, withdrawals 50 + 600, nothing captured out.
    total = sum(bal.available + bal.held for acct in before.values() for bal in acct.values())
    assert total == 1000 + 7 - 50 - 600

    # A clean stop, the state directory lost, a restart: the changelogs bring it all back.
    assert await engine.stop() == 0
    shutil.rmtree(engine.data_dir)
    await engine.start()
    after = {x: await engine.balances(x) for x in (a, b, c, d, e)}
    assert after == before
