"""The ingress end to end over HTTP, on the real stack: `tally ingress` processes in front
of a real engine worker, with the Redis and PostgreSQL sinks running beside them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from core.settings import Settings, child_env
from harness.procs import ROOT, EngineProcess, IngressProcess
from ingress import signing
from ingress.client import Client
from tests.integration.stack_support import scratch, sinks_in_process, started

PARTITIONS = 4
KEY_ID, SECRET = "it-client", "it-secret-0123456789"
pytestmark = pytest.mark.timeout(240)


@dataclass
class Front:
    settings: Settings
    engine: EngineProcess
    ingress: IngressProcess  # signed, in front of the engine
    second: IngressProcess  # a second process on the same deployment
    small: IngressProcess  # unsigned, 2 KiB bodies, 1 request/s, on a prefix with no engine
    unique: str

    def client(self, ingress: IngressProcess | None = None, *, signed: bool = True) -> Client:
        url = (ingress or self.ingress).url
        return Client(url, KEY_ID, SECRET) if signed else Client(url)

    def account(self, name: str) -> str:
        return f"{name}-{self.unique}"


@pytest.fixture(scope="module")
async def front(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Front]:
    d = scratch(settings, tmp_path_factory, "ing", PARTITIONS)
    keys = {KEY_ID: SECRET}
    engine = d.engine()
    ingress, second = d.ingress("ingress", keys=keys), d.ingress("second", keys=keys)
    small = d.ingress(
        "small", prefix=f"{d.prefix}-x", ingress_insecure=True, ingress_body_max_bytes=2048,
        ingress_rate_per_s=1, ingress_rate_burst=3,
    )  # fmt: skip
    async with sinks_in_process(d.settings), started([engine], [ingress, second, small]):
        yield Front(d.settings, engine, ingress, second, small, d.unique)


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


def _dep(command_id: str, account: str, amount: int = 100, asset: str = "USD") -> dict[str, Any]:
    return {"kind": "deposit", "command_id": command_id, "account": account, "asset": asset,
            "amount": amount}  # fmt: skip


async def test_every_command_kind_is_accepted_and_applied(front: Front) -> None:
    alice, bob, carol = front.account("alice"), front.account("bob"), front.account("carol")
    commands = [
        _dep("k1", alice, 1000),
        {"kind": "withdraw", "command_id": "k2", "account": alice, "asset": "USD", "amount": 100},
        {"kind": "transfer", "command_id": "k3", "account": alice, "to": bob, "asset": "USD",
         "amount": 200},
        {"kind": "disburse", "command_id": "k4", "account": alice, "asset": "USD",
         "legs": [{"to": bob, "amount": 30}, {"to": carol, "amount": 70}]},
        {"kind": "hold", "command_id": "k5", "account": alice, "hold_id": "h1", "asset": "USD",
         "amount": 300},
        {"kind": "release", "command_id": "k6", "account": alice, "hold_id": "h1"},
        {"kind": "hold", "command_id": "k7", "account": alice, "hold_id": "h2", "asset": "USD",
         "amount": 100},
        {"kind": "capture", "command_id": "k8", "account": alice, "hold_id": "h2", "amount": 60,
         "to": carol},
        {"kind": "configure", "command_id": "k9", "account": carol, "asset": "USD",
         "overdraft_limit": 10},
    ]  # fmt: skip
    async with front.client() as tally:
        for command in commands:
            answer = await tally.submit(command, wait=10)
            assert answer.status == 200, answer
            assert answer.body["command_id"] == command["command_id"]
            assert answer.body["status"] == "applied", answer.body
            assert answer.headers["Preference-Applied"] == "wait=10"
        want = {
            alice: {"available": 540, "held": 0},  # 1000-100-200-100, 60 captured of hold 100
            bob: {"available": 230, "held": 0},
            carol: {"available": 130, "held": 0},
        }

        async def strong_matches() -> bool:
            for account, balance in want.items():
                answer = await tally.balances(account, strong=True)
                assert answer.status == 200, answer
                usd = answer.body["balances"].get("USD", {})
                if {k: usd.get(k) for k in balance} != balance:
                    return False
            return True

        assert await _until(strong_matches), "credits never reached the payees"

        async def cached_matches() -> bool:
            for account in want:
                strong = await tally.balances(account, strong=True)
                cached = await tally.balances(account)
                assert cached.body["consistency"] == "cached"
                if cached.body["balances"] != strong.body["balances"]:
                    return False
            return True

        assert await _until(cached_matches), "Redis never caught up with the engine"

        async def recorded() -> bool:
            return (await tally.result("k9", account=carol)).status == 200

        assert await _until(recorded), "the PostgreSQL sink never recorded k9"
        answer = await tally.result("k8", account=alice)
        assert answer.body["status"] == "applied" and answer.body["kind"] == "capture"


async def test_a_retry_with_the_same_key_gives_the_same_result_and_one_effect(front: Front) -> None:
    account = front.account("retry")
    body = {"kind": "deposit", "account": account, "asset": "EUR", "amount": 25}
    async with front.client() as tally:
        first = await tally.submit(body, wait=10, idempotency_key="pay-1")
        again = await tally.submit(body, wait=10, idempotency_key="pay-1")
        async with front.client(front.second) as other:
            third = await other.submit({**body, "command_id": "pay-1"}, wait=10)
        reused = await tally.submit({**body, "amount": 26}, wait=10, idempotency_key="pay-1")
        assert first.status == again.status == third.status == reused.status == 200
        assert first.body["status"] == "applied"
        for repeat in (again, third):
            assert repeat.body["status"] == "duplicate"
            assert repeat.body["first"]["status"] == "applied"
            assert repeat.body["first"]["at_ms"] == first.body["at_ms"]
        assert reused.body["status"] == "rejected"
        assert reused.body["reason"] == "command_id_reused"
        strong = await tally.balances(account, strong=True)
        assert strong.body["balances"]["EUR"] == {"available": 25, "held": 0, "seq": 1}

        async def recorded() -> bool:
            return (await tally.result("pay-1")).status == 200

        assert await _until(recorded)
        assert (await tally.result("pay-1")).body["status"] == "applied"


async def test_results_go_to_the_process_that_produced_the_command(front: Front) -> None:
    account = front.account("many")
    async with front.client() as one, front.client(front.second) as two:
        answers = await asyncio.gather(
            *(
                (one if i % 2 else two).submit(_dep(f"m{i}", f"{account}-{i % 5}"), wait=10)
                for i in range(40)
            )
        )
    assert [a.status for a in answers] == [200] * 40
    assert [a.body["command_id"] for a in answers] == [f"m{i}" for i in range(40)]
    # Each process reads every result; it must hand a request the result of the record
    # that request produced, not any result of its command_id. Sent through both
    # processes at once, one id has two records and two results: one process's request
    # gets `applied`, the other's the `duplicate` that points at it, never both the same.
    async with front.client() as one, front.client(front.second) as two:
        pairs = await asyncio.gather(
            *(
                asyncio.gather(
                    one.submit(_dep(f"both{i}", f"{account}-b{i}"), wait=10),
                    two.submit(_dep(f"both{i}", f"{account}-b{i}"), wait=10),
                )
                for i in range(10)
            )
        )
    for i, (a, b) in enumerate(pairs):
        assert (a.status, b.status) == (200, 200), (a, b)
        assert {a.body["command_id"], b.body["command_id"]} == {f"both{i}"}
        statuses = sorted([a.body["status"], b.body["status"]])
        assert statuses == ["applied", "duplicate"], (a.body, b.body)
        applied, duplicate = (a, b) if a.body["status"] == "applied" else (b, a)
        assert duplicate.body["first"]["at_ms"] == applied.body["at_ms"], (a.body, b.body)


async def test_prefer_wait_answers_202_when_the_result_is_late(front: Front) -> None:
    # The small ingress's deployment has no engine: the result never comes.
    async with front.client(front.small, signed=False) as tally:
        started = time.monotonic()
        try:
            # Far past the 1 s asked for, and below the client's own timeout.
            async with asyncio.timeout(20):
                answer = await tally.submit(_dep("late-1", front.account("late")), wait=1)
        except TimeoutError:
            pytest.fail("Prefer: wait=1 with no result coming: no 202 in 20 s, it never gave up")
        waited = time.monotonic() - started
    assert answer.status == 202, answer
    assert answer.body["status"] == "accepted" and answer.body["command_id"] == "late-1"
    assert answer.headers["Preference-Applied"] == "wait=1"
    assert waited >= 1.0, f"answered after {waited:.2f}s: it did not wait for the result"


async def test_cached_reads_come_from_redis_and_strong_reads_from_the_engine(
    front: Front,
) -> None:
    account = front.account("reads")
    async with front.client() as tally:
        assert (await tally.submit(_dep("r1", account, 5), wait=10)).status == 200

        async def cached_has(seq: int) -> bool:
            usd = (await tally.balances(account)).body["balances"].get("USD", {})
            return usd.get("seq") == seq

        assert await _until(lambda: cached_has(1))
        # What the cache serves is what Redis holds: change Redis behind its back.
        import redis.asyncio as aioredis

        from sinks.redis_store import balance_key
        from topics.shard import shard_of

        key = balance_key(front.settings.topic_prefix, shard_of(account, PARTITIONS), account,
                          "USD")  # fmt: skip
        r = aioredis.from_url(front.settings.redis_url)
        try:
            await r.hset(key, mapping={"available": 999, "held": 0, "seq": 1})
            cached = await tally.balances(account)
            strong = await tally.balances(account, strong=True)
        finally:
            await r.hset(key, mapping={"available": 5, "held": 0, "seq": 1})
            await r.aclose()
        assert cached.body["balances"]["USD"]["available"] == 999
        assert strong.body["balances"]["USD"] == {"available": 5, "held": 0, "seq": 1}
        assert strong.body["consistency"] == "strong"
        assert (await tally.balances(front.account("nobody"))).body["balances"] == {}


async def test_the_client_sends_ids_with_reserved_characters_as_it_signed_them(
    front: Front,
) -> None:
    """Ids may hold ':' and '.', which a URL library rewrites ("%3A" to ":", ".." to a
    step up) after the client signed the path: the request must still verify."""
    account, command_id = f"{front.account('a:b')}.", f"id:{front.unique}.."
    async with front.client() as tally:
        applied = await tally.submit(_dep(command_id, account, 7), wait=10)
        assert applied.status == 200, applied
        strong = await tally.balances(account, strong=True)
        assert strong.status == 200, strong
        assert strong.body["balances"]["USD"] == {"available": 7, "held": 0, "seq": 1}
        assert await _until(lambda: _has_result(tally, command_id, account))
        for name in (".", ".."):
            cached = await tally.balances(name)
            assert cached.status == 200 and cached.body["account"] == name, cached


async def _has_result(tally: Client, command_id: str, account: str) -> bool:
    answer = await tally.result(command_id, account)
    assert answer.status in (200, 404), answer  # never 401: signed as sent
    return answer.status == 200


async def test_batch_is_answered_per_item(front: Front) -> None:
    account = front.account("batch")
    good = [_dep(f"b{i}", f"{account}-{i % 7}", 10) for i in range(300)]
    async with front.client() as tally:
        answer = await tally.submit_batch(good)
        assert answer.status == 202, answer
        assert answer.body["accepted"] == 300
        assert [item["status"] for item in answer.body["items"]] == [202] * 300
        mixed = await tally.submit_batch([_dep("bx1", account), {"kind": "deposit"}, 7])
        assert mixed.status == 207
        statuses = [(i["status"], i.get("problem", {}).get("field")) for i in mixed.body["items"]]
        assert statuses == [(202, None), (422, "commands[1].command_id"), (422, "commands[2]")]

        async def all_applied() -> bool:
            total = 0
            for k in range(7):
                usd = (await tally.balances(f"{account}-{k}", strong=True)).body["balances"]
                total += usd.get("USD", {}).get("available", 0)
            return total == 300 * 10

        assert await _until(all_applied)


async def test_bad_signatures_get_401_and_produce_nothing(front: Front) -> None:
    account = front.account("unsigned")
    body = msgspec.json.encode(_dep("s1", account))
    now = time.time()

    def sign(secret: str = SECRET, target: str = "/v1/commands", at: float = now,
             **changed: str) -> dict[str, str]:  # fmt: skip
        return signing.sign(KEY_ID, secret.encode(), "POST", target, body,
                            content_type="application/json", now=at, **changed)  # fmt: skip

    good = sign()
    cases: list[tuple[dict[str, str], bytes, str]] = [
        ({}, body, "Tally-Key-Id"),
        ({**good, "Tally-Signature": sign("wrong-secret-000000")["Tally-Signature"]}, body,
         "Tally-Signature"),
        (sign(at=now - 600), body, "Tally-Timestamp"),
        ({k: v for k, v in good.items() if k != "Tally-Nonce"}, body, "Tally-Nonce"),
        (good, body.replace(b"100", b"900"), "Tally-Signature"),  # body changed after signing
        ({**good, "Tally-Key-Id": "someone-else"}, body, "Tally-Signature"),
        (sign(target="/v1/commands/batch"), body, "Tally-Signature"),  # signed for another path
        ({**good, "Idempotency-Key": "s1"}, body, "Tally-Signature"),  # a header not signed
        (sign(idempotency_key="s1"), body, "Tally-Signature"),  # signed, then not sent
    ]  # fmt: skip
    async with aiohttp.ClientSession() as session:
        for headers, sent, field in cases:
            async with session.post(
                f"{front.ingress.url}/v1/commands",
                data=sent,
                headers={**headers, "Content-Type": "application/json"},
            ) as response:
                problem = await response.json(content_type=None)
                assert response.status == 401, problem
                assert response.content_type == "application/problem+json"
                assert problem["field"] == field, (field, problem)
                assert SECRET not in await response.text()
    async with front.client() as tally:
        # After a signed command on the same account (same partition, in order) is
        # applied, nothing from the refused requests can still be on its way.
        assert (await tally.submit(_dep("s2", account, 1), wait=10)).status == 200
        strong = await tally.balances(account, strong=True)
        assert strong.body["balances"]["USD"] == {"available": 1, "held": 0, "seq": 1}
    log = front.ingress.tail(400)
    assert SECRET not in log


DEP = b'{"kind":"deposit","command_id":"x1","account":"bad","asset":"USD","amount":5}'
BAD_ID = "x" * 129


def _with(field: str, value: str) -> bytes:
    obj = msgspec.json.decode(DEP)
    obj[field] = msgspec.json.decode(value)
    return msgspec.json.encode(obj)


# (method, target, extra headers, body, expected status, expected field)
BAD_REQUESTS: list[tuple[str, str, dict[str, str], bytes, int, str | None]] = [
    ("POST", "/v1/commands", {}, b'{"kind": "deposit",', 400, "body"),
    ("POST", "/v1/commands", {}, b"", 400, "body"),
    ("POST", "/v1/commands", {}, b"\xff\xfe\xfd", 400, "body"),
    ("POST", "/v1/commands", {}, b"[" * 5000 + b"]" * 5000, 400, "body"),
    ("POST", "/v1/commands", {}, b"NaN", 400, "body"),
    ("POST", "/v1/commands", {"Content-Type": "text/plain"}, DEP, 415, "Content-Type"),
    ("POST", "/v1/commands", {"Content-Type": ""}, DEP, 415, "Content-Type"),
    ("POST", "/v1/commands", {}, b"[1, 2]", 422, "body"),
    ("POST", "/v1/commands", {}, _with("kind", '"mint"'), 422, "kind"),
    ("POST", "/v1/commands", {}, _with("kind", '"credit"'), 422, "kind"),
    ("POST", "/v1/commands", {}, DEP.replace(b',"amount":5', b""), 422, "amount"),
    ("POST", "/v1/commands", {}, _with("amount", "5.0"), 422, "amount"),
    ("POST", "/v1/commands", {}, _with("amount", "-5"), 422, "amount"),
    ("POST", "/v1/commands", {}, _with("amount", "0"), 422, "amount"),
    ("POST", "/v1/commands", {}, _with("amount", str(2**127)), 422, "amount"),
    ("POST", "/v1/commands", {}, _with("amount", '"5"'), 422, "amount"),
    ("POST", "/v1/commands", {}, _with("amount", "true"), 422, "amount"),
    ("POST", "/v1/commands", {}, _with("account", '"has space"'), 422, "account"),
    ("POST", "/v1/commands", {}, _with("account", '"' + "a" * 65 + '"'), 422, "account"),
    ("POST", "/v1/commands", {}, _with("asset", '"usd"'), 422, "asset"),
    ("POST", "/v1/commands", {}, _with("memo", '"hi"'), 422, "memo"),
    ("POST", "/v1/commands", {}, _with("v", "2"), 422, "v"),
    ("POST", "/v1/commands", {}, _with("command_id", f'"{BAD_ID}"'), 422, "command_id"),
    ("POST", "/v1/commands", {}, DEP.replace(b'"command_id":"x1",', b""), 422, "command_id"),
    ("POST", "/v1/commands", {"Idempotency-Key": "other"}, DEP, 422, "command_id"),
    ("POST", "/v1/commands", {"Idempotency-Key": "bad key"}, DEP, 400, "Idempotency-Key"),
    ("POST", "/v1/commands", {"Prefer": "wait=31"}, DEP, 400, "Prefer"),
    ("POST", "/v1/commands?debug=1", {}, DEP, 400, "debug"),
    ("POST", "/v1/commands", {},
     b'{"kind":"disburse","command_id":"x2","account":"bad","asset":"USD",'
     b'"legs":[{"to":"b","amount":1},{"to":"c"}]}', 422, "legs[1].amount"),
    ("POST", "/v1/commands", {},
     b'{"kind":"hold","command_id":"x3","account":"bad","hold_id":"h","asset":"USD",'
     b'"amount":1,"expires_at_ms":-1}', 422, "expires_at_ms"),
    ("POST", "/v1/commands/batch", {}, b'{"commands": []}', 422, "commands"),
    ("POST", "/v1/commands/batch", {}, b'{"commands": [' + b",".join([DEP] * 1001) + b"]}",
     422, "commands"),
    ("POST", "/v1/commands/batch", {}, DEP, 422, "commands"),
    ("POST", "/v1/commands/batch", {"Idempotency-Key": "k"}, b'{"commands": [' + DEP + b"]}",
     400, "Idempotency-Key"),
    ("GET", "/v1/accounts/has%20space/balances", {}, b"", 400, "account"),
    ("GET", "/v1/accounts/bad/balances?consistency=eventual", {}, b"", 400, "consistency"),
    ("GET", f"/v1/commands/{BAD_ID}", {}, b"", 400, "command_id"),
    ("GET", "/v1/commands/x1?account=has%20space", {}, b"", 400, "account"),
    ("PUT", "/v1/commands", {}, DEP, 405, None),
    ("GET", "/v1/nothing-here", {}, b"", 404, None),
]  # fmt: skip


async def test_bad_requests_get_a_precise_problem_and_change_nothing(front: Front) -> None:
    assert len(BAD_REQUESTS) >= 25
    failures = []
    async with front.client() as tally:
        for method, target, headers, body, status, field in BAD_REQUESTS:
            sent = {"Content-Type": "application/json", **headers}
            answer = await tally.request(method, target, body, sent)
            problem = answer.body if isinstance(answer.body, dict) else {}
            got = (answer.status, problem.get("field"))
            if (
                got != (status, field)
                or answer.headers.get("Content-Type") != "application/problem+json"
                or problem.get("status") != status
            ):
                failures.append((method, target[:60], body[:60], (status, field), got, problem))
        assert not failures, "\n".join(map(str, failures))
        # Nothing of the above was produced: a later command on the same account is the
        # account's first.
        answer = await tally.submit(_dep("after-bad", "bad", 1), wait=10)
        assert answer.status == 200 and answer.body["entries"][0]["seq"] == 1, answer


async def test_body_size_and_rate_limits(front: Front) -> None:
    async with front.client(front.small, signed=False) as tally:
        big = msgspec.json.encode({**_dep("big", "a"), "memo": "x" * 4000})
        answer = await tally.request("POST", "/v1/commands", big)
        assert (answer.status, answer.body["field"]) == (413, "body"), answer
        statuses = []
        for _ in range(6):
            statuses.append(await tally.balances("a"))
    limited = [a for a in statuses if a.status == 429]
    assert limited, [a.status for a in statuses]
    assert int(limited[0].headers["Retry-After"]) >= 1
    assert limited[0].headers["Content-Type"] == "application/problem+json"


async def test_health_metrics_and_openapi(front: Front) -> None:
    async with front.client() as tally:
        assert (await tally.request("GET", "/livez")).body == {"status": "ok"}
        ready = await tally.request("GET", "/readyz")
        assert ready.status == 200
        assert ready.body == {
            "ready": True,
            "checks": dict.fromkeys(("kafka", "postgres", "redis"), "ok"),
        }
        await tally.submit(_dep("metric-1", front.account("metrics")), wait=0)
        text = (await tally.request("GET", "/metrics")).body
        document = (await tally.request("GET", "/openapi.json")).body
    assert isinstance(text, str)
    assert 'tally_ingress_requests_total{method="POST",route="/v1/commands",status="202"}' in text
    assert 'tally_ingress_request_duration_seconds_bucket{le="0.005",method="POST"' in text
    assert "tally_ingress_produce_duration_seconds_count" in text
    assert 'tally_ingress_commands_total{kind="deposit",outcome="accepted"}' in text
    assert front.unique not in text  # no account ids as labels
    assert document["openapi"] == "3.1.0"
    assert "/v1/commands" in document["paths"]


def test_ingress_refuses_to_start_without_keys_or_the_insecure_switch(settings: Settings) -> None:
    env = child_env(msgspec.structs.replace(settings, ingress_keys="", ingress_insecure=False))
    done = subprocess.run([sys.executable, "-m", "tally.cli", "ingress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "TALLY_INGRESS_KEYS is empty" in done.stderr


def test_the_insecure_switch_is_warned_about(front: Front) -> None:
    assert "requests are NOT signature-checked" in front.small.tail(400)
    assert "NOT signature-checked" not in front.ingress.tail(400)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _server_socket_inode(server_port: int, client_port: int) -> int | None:
    """The inode of the accepted socket of the loopback connection from `client_port`."""
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[9])
    return None


def _holder(inode: int, pids: list[int]) -> int | None:
    """Which of `pids` holds the socket `inode` open."""
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir() if fds.exists() else []:
            with contextlib.suppress(OSError):
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
    return None


async def _answering(port: int, pids: list[int], connections: int = 40) -> dict[int, int]:
    """Open `connections` connections to the shared port, ask each GET /livez, and count
    per process (by who holds the accepted socket) the connections answered 200."""
    answered: dict[int, int] = {}
    for _ in range(connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status = await asyncio.wait_for(reader.readline(), 10)
            inode = _server_socket_inode(port, writer.get_extra_info("sockname")[1])
            holder = _holder(inode, pids) if inode is not None else None
            if status.startswith(b"HTTP/1.1 200") and holder is not None:
                answered[holder] = answered.get(holder, 0) + 1
        finally:
            writer.close()
            await writer.wait_closed()
    return answered


async def test_several_processes_share_one_port_and_a_dead_one_is_replaced(
    settings: Settings, tmp_path: Path
) -> None:
    proc = IngressProcess(settings, prefix=f"ing2-{time.time_ns()}", log_path=tmp_path / "i.log",
                          partitions=PARTITIONS, keys={KEY_ID: SECRET}, processes=2)  # fmt: skip
    await proc.start()
    try:
        assert proc.proc is not None
        children = _children(proc.proc.pid)
        assert len(children) == 2, proc.tail()
        # Sharing the port: connections to it are accepted and answered by both.
        answered = await _answering(proc.port, children)
        assert sorted(answered) == sorted(children), (answered, children)
        os.kill(children[0], signal.SIGKILL)
        async with Client(proc.url, KEY_ID, SECRET) as tally:
            # The survivor keeps serving the port meanwhile.
            answers = [await tally.request("GET", "/livez") for _ in range(20)]
            assert {a.status for a in answers} == {200}

        async def replaced() -> bool:
            now = _children(proc.proc.pid) if proc.proc else []
            return len(now) == 2 and children[0] not in now

        assert await _until(replaced, 30), proc.tail()
        await proc.wait_ready()
        now = _children(proc.proc.pid)
        answered: dict[int, int] = {}

        async def both_answer() -> bool:  # the new one too, once it listens
            answered.update(await _answering(proc.port, now, connections=20))
            return sorted(answered) == sorted(now)

        assert await _until(both_answer, 30), (answered, now, proc.tail())
    finally:
        await proc.stop()
    assert "starting it again" in proc.tail(200)
