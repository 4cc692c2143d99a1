"""The ledger's read API end to end (issue 16), through the signed client: metadata and
references on every store, history pages, balances at a point in time, account details
and batches that wait; on a real engine worker, ingress and PostgreSQL/Redis sinks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import pytest

from core.settings import Settings
from harness.procs import IngressProcess
from ingress.client import Client
from sinks.pg import quote
from tests.integration.stack_support import scratch, sinks_in_process, started
from topics import limits

PARTITIONS = 2
KEY_ID, SECRET = "reads-client", "reads-secret-0123456789"
pytestmark = pytest.mark.timeout(300)


@dataclass
class Stack:
    settings: Settings
    ingress: IngressProcess
    unique: str

    def client(self) -> Client:
        return Client(self.ingress.url, KEY_ID, SECRET)

    def account(self, name: str) -> str:
        return f"{name}-{self.unique}"


@pytest.fixture(scope="module")
async def stack(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    d = scratch(settings, tmp_path_factory, "reads", PARTITIONS)
    engine, ingress = d.engine(), d.ingress("ingress", keys={KEY_ID: SECRET})
    async with sinks_in_process(d.settings), started([engine], [ingress]):
        yield Stack(d.settings, ingress, d.unique)


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


async def _all_entries(tally: Client, account: str, asset: str) -> list[dict[str, Any]]:
    """Every entry of a balance, by following `next` links."""
    out: list[dict[str, Any]] = []
    answer = await tally.entries(account, asset, limit=1000)
    while True:
        assert answer.status == 200, answer.body
        out.extend(answer.body["entries"])
        if answer.body["next"] is None:
            return out
        answer = await tally.page(answer.body["next"])


async def _recorded(tally: Client, account: str, asset: str, seq: int) -> None:
    """Wait until PostgreSQL holds the balance's entries up to `seq`."""

    async def there() -> bool:
        answer = await tally.entries(account, asset, after_seq=seq - 1, limit=1)
        return answer.status == 200 and len(answer.body["entries"]) == 1

    assert await _until(there), f"PostgreSQL never recorded {account}/{asset} seq {seq}"


def _deposit(account: str, command_id: str, amount: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "deposit", "command_id": command_id, "account": account, "asset": "USD",
            "amount": amount, **extra}  # fmt: skip


async def test_metadata_and_reference_reach_every_store(stack: Stack) -> None:
    alice, bob = stack.account("alice"), stack.account("bob")
    meta = {"order": "o-17", "note": "first payment ✓"}
    async with stack.client() as tally:
        first = await tally.submit(
            _deposit(alice, "m-1", 500, reference="order-17", metadata=meta), wait=10
        )
        assert first.status == 200, first.body
        assert first.body["reference"] == "order-17" and first.body["metadata"] == meta
        pay = {"kind": "transfer", "command_id": "m-2", "account": alice, "to": bob,
               "asset": "USD", "amount": 200, "reference": "order-17",
               "metadata": meta}  # fmt: skip
        assert (await tally.submit(pay, wait=10)).body["status"] == "applied"
        # The same command again is a duplicate; with other metadata, a reused id.
        again = await tally.submit(pay, wait=10)
        assert again.body["status"] == "duplicate"
        other = await tally.submit({**pay, "metadata": {"order": "o-18"}}, wait=10)
        assert other.body["reason"] == "command_id_reused", other.body
        dropped = {k: v for k, v in pay.items() if k != "metadata"}
        assert (await tally.submit(dropped, wait=10)).body["reason"] == "command_id_reused"
        other_ref = await tally.submit({**pay, "reference": "order-18"}, wait=10)
        assert other_ref.body["reason"] == "command_id_reused"

        await _recorded(tally, bob, "USD", 1)
        await _recorded(tally, alice, "USD", 2)
        found = await tally.commands("order-17")
        assert found.status == 200
        # The payee's credit is a command of its own, with its origin's reference.
        assert {(c["account"], c["command_id"]) for c in found.body["commands"]} == {
            (alice, "m-1"),
            (alice, "m-2"),
            (bob, f"{alice}/m-2/credit"),
        }
        assert all(c["metadata"] == meta for c in found.body["commands"])
        assert (await tally.result("m-2", account=alice)).body["reference"] == "order-17"
        history = await _all_entries(tally, alice, "USD")
        assert [(e["seq"], e["reference"], e["metadata"]) for e in history] == [
            (1, "order-17", meta),
            (2, "order-17", meta),
        ]
        # The payee's credit carries its origin's reference and metadata.
        (credit,) = await _all_entries(tally, bob, "USD")
        assert credit["kind"] == "credit" and credit["metadata"] == meta
        assert credit["reference"] == "order-17"

    conn = await asyncpg.connect(
        stack.settings.pg_dsn, server_settings={"search_path": quote(stack.settings.topic_prefix)}
    )
    try:
        rows = await conn.fetch(
            "SELECT reference, metadata::text AS m FROM command_results WHERE account = $1", alice
        )
        assert [(r["reference"], msgspec.json.decode(r["m"])) for r in rows] == [
            ("order-17", meta)
        ] * 2
    finally:
        await conn.close()


async def test_over_limit_metadata_and_references_are_refused(stack: Stack) -> None:
    account = stack.account("limits")
    too_many = {f"k{i}": "v" for i in range(limits.METADATA_KEYS_MAX + 1)}
    too_big = {f"k{i}": "v" * 100 for i in range(12)}
    cases = [
        ({"metadata": too_many}, "metadata"),
        ({"metadata": too_big}, "metadata"),
        ({"metadata": {"bad key": "v"}}, "metadata"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"metadata": {"k": "a\u0000b"}}, "metadata"),
        ({"metadata": ["k"]}, "metadata"),
        ({"reference": ""}, "reference"),
        ({"reference": "x" * 129}, "reference"),
        ({"reference": "a/b"}, "reference"),
    ]
    async with stack.client() as tally:
        for i, (extra, field) in enumerate(cases):
            answer = await tally.submit(_deposit(account, f"lim-{i}", 1, **extra))
            assert answer.status == 422, (extra, answer.body)
            assert answer.body["field"].startswith(field), (extra, answer.body)
        for query in ("", "?reference=", "?reference=a%2Fb", "?reference=x&x=1"):
            answer = await tally.request("GET", "/v1/commands" + query)
            assert answer.status == 400, (query, answer.body)


async def test_history_pages_walk_every_entry_once_while_commands_arrive(stack: Stack) -> None:
    account = stack.account("busy")
    total, batch = 240, 20
    async with stack.client() as tally, stack.client() as writer:

        async def write() -> None:
            for start in range(0, total, batch):
                commands = [
                    _deposit(account, f"busy-{i}", i + 1) for i in range(start, start + batch)
                ]
                answer = await writer.submit_batch(commands)
                assert answer.status == 202, answer.body
                await asyncio.sleep(0.05)

        writing = asyncio.create_task(write())
        seen: list[dict[str, Any]] = []
        after = 0
        deadline = time.monotonic() + 60
        while len(seen) < total and time.monotonic() < deadline:
            answer = await tally.entries(account, "USD", after_seq=after, limit=7)
            assert answer.status == 200, answer.body
            page = answer.body["entries"]
            seen.extend(page)
            if page:
                after = page[-1]["seq"]
            if answer.body["next"] is None:
                await asyncio.sleep(0.05)
            else:
                assert answer.body["next"].endswith(f"after_seq={after}&limit=7")
        await writing
    assert [e["seq"] for e in seen] == list(range(1, total + 1))
    balance = 0
    for e in seen:
        balance += e["delta_available"]
        assert e["available"] == balance and e["kind"] == "deposit"
    assert balance == total * (total + 1) // 2


def _fold(entries: list[dict[str, Any]], upto: Callable[[dict[str, Any]], bool]) -> dict[str, int]:
    available = held = seq = 0
    for e in entries:
        if upto(e):
            available += e["delta_available"]
            held += e["delta_held"]
            seq = e["seq"]
    return {"available": available, "held": held, "seq": seq}


async def test_balances_at_a_seq_or_a_time_equal_a_fold_of_the_entries(stack: Stack) -> None:
    account = stack.account("past")
    async with stack.client() as tally:
        n = 0
        for round_ in range(5):  # 250 entries, in batches at distinct times
            commands = [_deposit(account, f"p-{round_}-{i}", 1 + (i * 7919) % 1000)
                        for i in range(50)]  # fmt: skip
            assert (await tally.submit_batch(commands)).status == 202
            n += 50
            await _recorded(tally, account, "USD", n)
            await asyncio.sleep(0.02)
        hold = {"kind": "hold", "command_id": "p-hold", "account": account, "hold_id": "h1",
                "asset": "USD", "amount": 10}  # fmt: skip
        assert (await tally.submit(hold, wait=10)).body["status"] == "applied"
        n += 1
        await _recorded(tally, account, "USD", n)
        entries = await _all_entries(tally, account, "USD")
        assert [e["seq"] for e in entries] == list(range(1, n + 1))

        for seq in (0, 1, 99, 100, 101, 150, 200, 250, n):
            answer = await tally.balances_at(account, seq=seq, asset="USD")
            assert answer.status == 200, answer.body
            assert answer.body["balances"]["USD"] == _fold(entries, lambda e, s=seq: e["seq"] <= s)
        beyond = await tally.balances_at(account, seq=n + 1, asset="USD")
        assert beyond.status == 404 and beyond.body["field"] == "seq"

        times = [entries[0]["at_ms"] - 1, entries[0]["at_ms"], entries[99]["at_ms"],
                 entries[149]["at_ms"], entries[199]["at_ms"] + 1, entries[-1]["at_ms"],
                 entries[-1]["at_ms"] + 86_400_000]  # fmt: skip
        for t in times:
            want = _fold(entries, lambda e, t=t: e["at_ms"] <= t)
            answer = await tally.balances_at(account, at=t)
            assert answer.status == 200, answer.body
            got = answer.body["balances"].get("USD", {"available": 0, "held": 0, "seq": 0})
            assert got == want, t
            named = await tally.balances_at(account, at=t, asset="USD")
            assert named.body["balances"]["USD"] == want
            rfc3339 = datetime.fromtimestamp(t / 1000, UTC).isoformat(timespec="milliseconds")
            again = await tally.balances_at(account, at=rfc3339.replace("+00:00", "Z"))
            assert again.body["balances"] == answer.body["balances"], rfc3339
        assert (await tally.balances_at(account, at=times[0])).body["balances"] == {}

        bad = [("at", "yesterday"), ("at", "2026-13-01T00:00:00Z"), ("at", "2026-12-01T00:00:00"),
               ("at", "9" * 30), ("at", "-1"), ("at", ""), ("seq", "-1"), ("seq", "x"),
               ("seq", str(2**63))]  # fmt: skip
        for name, value in bad:
            answer = await tally.balances_at(account, asset="USD", **{name: value})
            assert answer.status == 400 and answer.body["field"] == name, (name, value, answer.body)
        twice = await tally.request("GET", f"/v1/accounts/{account}/balances?at=1&at=2")
        assert twice.status == 400 and twice.body["field"] == "at"
        both = await tally.balances_at(account, at=1, seq=1, asset="USD")
        assert both.status == 400
        no_asset = await tally.balances_at(account, seq=1)
        assert no_asset.status == 400 and no_asset.body["field"] == "asset"


async def test_bad_history_cursors_are_refused_naming_the_field(stack: Stack) -> None:
    account = stack.account("cursor")
    async with stack.client() as tally:
        target = f"/v1/accounts/{account}/entries"
        for query, field in [("", "asset"), ("?asset=usd", "asset"),
                             ("?asset=USD&after_seq=-1", "after_seq"),
                             ("?asset=USD&after_seq=abc", "after_seq"),
                             ("?asset=USD&after_seq=99999999999999999999", "after_seq"),
                             ("?asset=USD&before_seq=0", "before_seq"),
                             ("?asset=USD&limit=0", "limit"), ("?asset=USD&limit=1001", "limit"),
                             ("?asset=USD&cursor=1", "cursor"),
                             ("?asset=USD&asset=EUR", "asset"),
                             ("?asset=USD&after_seq=1&after_seq=2", "after_seq"),
                             ("?asset=USD&after_seq=%00", "after_seq"),
                             ("?asset=USD&limit=%D9%A3", "limit")]:  # fmt: skip
            answer = await tally.request("GET", target + query)
            assert answer.status == 400 and answer.body["field"] == field, (query, answer.body)
        # An account named ".." pages too: its next link keeps the dots escaped.
        assert (
            await tally.submit(_deposit("..", f"dots-{stack.unique}", 1), wait=10)
        ).status == 200
        await _recorded(tally, "..", "USD", 1)
        page = await tally.entries("..", "USD", limit=1)
        assert page.body["next"].startswith("/v1/accounts/%2E%2E/entries?")
        assert (await tally.page(page.body["next"])).status == 200
        empty = await tally.entries(account, "USD")
        assert empty.status == 200 and empty.body["entries"] == [] and empty.body["next"] is None


async def test_big_amounts_read_back_exactly(stack: Stack) -> None:
    account = stack.account("big")
    async with stack.client() as tally:
        big = {"kind": "deposit", "command_id": "big-1", "account": account, "asset": "WEI",
               "amount": limits.AMOUNT_MAX}  # fmt: skip
        assert (await tally.submit(big, wait=10)).body["status"] == "applied"
        await _recorded(tally, account, "WEI", 1)
        (entry,) = await _all_entries(tally, account, "WEI")
        assert entry["available"] == entry["delta_available"] == limits.AMOUNT_MAX
        at_seq = await tally.balances_at(account, seq=1, asset="WEI")
        assert at_seq.body["balances"]["WEI"]["available"] == limits.AMOUNT_MAX
        now = await tally.balances_at(account, at=entry["at_ms"])
        assert now.body["balances"]["WEI"]["available"] == limits.AMOUNT_MAX


async def test_account_details_come_from_the_engine(stack: Stack) -> None:
    account = stack.account("details")
    async with stack.client() as tally:
        assert (await tally.submit(_deposit(account, "d-1", 5), wait=10)).status == 200
        limit = {"kind": "configure", "command_id": "d-2", "account": account, "asset": "EUR",
                 "overdraft_limit": limits.LIMIT_MAX}  # fmt: skip
        assert (await tally.submit(limit, wait=10)).body["status"] == "applied"
        freeze = {"kind": "configure", "command_id": "d-3", "account": account,
                  "status": "frozen"}  # fmt: skip
        assert (await tally.submit(freeze, wait=10)).body["status"] == "applied"
        answer = await tally.account(account)
        assert answer.status == 200, answer.body
        body = answer.body
        assert body["status"] == "frozen" and body["consistency"] == "strong"
        assert "USD" in body["assets"] and body["last_seq"]["USD"] == 1
        assert body["overdraft_limits"]["EUR"] == limits.LIMIT_MAX
        assert body["overdraft_limits"]["USD"] == 0
        assert (await tally.request("GET", "/v1/accounts/a%2Fb")).status in (400, 404)


async def test_a_batch_that_waits_answers_each_item_with_its_result(stack: Stack) -> None:
    account = stack.account("waits")
    commands = [_deposit(account, f"w-{i}", i + 1, reference=f"w-ref-{i}") for i in range(5)]
    async with stack.client() as tally:
        answer = await tally.submit_batch(commands, wait=10)
        assert answer.status == 200, answer.body
        assert answer.headers["Preference-Applied"] == "wait=10"
        assert answer.body["answered"] == 5
        for i, item in enumerate(answer.body["items"]):
            assert item["status"] == 200 and item["result"]["command_id"] == f"w-{i}"
            assert item["result"]["status"] == "applied"
            assert item["result"]["reference"] == f"w-ref-{i}"
        # The same batch again: each item gets its own sending's answer, a duplicate.
        again = await tally.submit_batch(commands, wait=10)
        assert again.status == 200
        assert [i["result"]["status"] for i in again.body["items"]] == ["duplicate"] * 5
        # One invalid item: the others still carry their results, and the batch is 207.
        mixed = [_deposit(account, "w-5", 1), {"kind": "deposit", "account": account}]
        answer = await tally.submit_batch(mixed, wait=10)
        assert answer.status == 207, answer.body
        first, second = answer.body["items"]
        assert first["status"] == 200 and first["result"]["status"] == "applied"
        assert second["status"] == 422 and "result" not in second
        # Without wait, nothing changes: 202 and no results.
        plain = await tally.submit_batch([_deposit(account, "w-6", 1)])
        assert plain.status == 202 and "result" not in plain.body["items"][0]
        bad = await tally.request(
            "POST", "/v1/commands/batch", msgspec.json.encode({"commands": commands}),
            {"Prefer": "wait=31"},
        )  # fmt: skip
        assert bad.status == 400 and bad.body["field"] == "Prefer"


async def test_without_an_engine_a_waiting_batch_is_207_and_details_are_503(
    stack: Stack, tmp_path: Any
) -> None:
    # A deployment of its own with no engine: nothing answers the commands.
    lonely = IngressProcess(
        stack.settings, prefix=f"{stack.settings.topic_prefix}-lonely",
        log_path=tmp_path / "lonely.log", partitions=PARTITIONS, keys={KEY_ID: SECRET},
    )  # fmt: skip
    await lonely.start()
    try:
        async with Client(lonely.url, KEY_ID, SECRET) as tally:
            commands = [_deposit("nobody", f"l-{i}", 1) for i in range(3)]
            answer = await tally.submit_batch(commands, wait=1)
            assert answer.status == 207, answer.body
            assert answer.headers["Preference-Applied"] == "wait=1"
            assert answer.body["accepted"] == 3 and answer.body["answered"] == 0
            assert [i["status"] for i in answer.body["items"]] == [202] * 3
            details = await tally.account("nobody")
            assert details.status == 503 and details.body["field"] == "engine"
    finally:
        await lonely.stop()
