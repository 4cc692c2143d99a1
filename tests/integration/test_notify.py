"""Subscriptions and `tally notify` against the real stack and real HTTP receivers on
loopback: one that answers 200, one that answers 500 for a while, one that hangs, one
that is down (#17)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiohttp import web

from core.settings import Settings
from harness.procs import EngineProcess, IngressProcess, NotifyProcess, free_port
from ingress.client import Client
from notify import rules, store
from sinks.migrate import migrate
from sinks.pg import quote

PARTITIONS = 4
KEY_ID = "notify-test"
SECRET = "notify-test-secret-0123456789"
SUB_SECRET = "subscriber-secret-0123456789"
# A JSON content type on the subscription calls, as a client sends them (ingress.client
# no longer needs it for body-less POSTs: tests/integration/test_client_signing.py).
JSON: dict[str, Any] = {"headers": {"Content-Type": "application/json"}}
# Short, so that retries and parking happen within a test.
NOTIFY = {
    "notify_timeout_ms": 700,
    "notify_backoff_first_ms": 50,
    "notify_backoff_max_ms": 400,
    "notify_retry_horizon_s": 2,
    "notify_concurrency": 4,
    "notify_queue_max": 16,
    "notify_refresh_ms": 200,
    "notify_progress_ms": 100,
}


@dataclass
class Receiver:
    """An HTTP endpoint on loopback recording every request it gets. `mode`: ok (200),
    flaky (500 for its first `failures` requests, then 200), hang (never answers)."""

    mode: str = "ok"
    failures: int = 0
    delay_s: float = 0.0  # before answering 200
    slow: dict[str, float] = field(default_factory=dict)  # account -> its delay instead
    port: int = field(default_factory=free_port)
    requests: list[dict[str, Any]] = field(default_factory=list)
    acked: list[dict[str, Any]] = field(default_factory=list)  # bodies answered 2xx
    bad_signatures: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = dict(request.headers)
        if not rules.verify(SUB_SECRET.encode(), headers, raw, now_s=int(time.time())):
            self.bad_signatures += 1
            return web.Response(status=401)
        body = msgspec.json.decode(raw)
        assert headers[rules.DELIVERY_ID] == body["delivery_id"]
        assert headers[rules.COMMAND_ID] == body["command_id"] == body["event"]["command_id"]
        self.requests.append(body)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "flaky" and len(self.requests) <= self.failures:
            return web.Response(status=500)
        delay_s = self.slow.get(body["event"]["account"], self.delay_s)
        if delay_s:
            await asyncio.sleep(delay_s)
        self.acked.append(body)
        return web.Response(status=200)

    def delivered(self) -> set[str]:
        return {b["delivery_id"] for b in self.acked}


@dataclass
class Stack:
    client: Client
    notifier: NotifyProcess
    prefix: str


@pytest.fixture(scope="module")
async def stack(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    prefix = f"ntf-{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp("notify")
    await migrate(settings.pg_dsn, prefix, PARTITIONS)
    engine = EngineProcess(settings, prefix=prefix, data_dir=tmp / "engine", partitions=PARTITIONS)
    ingress = IngressProcess(
        settings, prefix=prefix, log_path=tmp / "ingress.log", partitions=PARTITIONS,
        keys={KEY_ID: SECRET}, notify_allow_private=True,
    )  # fmt: skip
    notifier = NotifyProcess(
        settings, prefix=prefix, log_path=tmp / "notify.log", partitions=PARTITIONS, **NOTIFY
    )
    await engine.start()
    try:
        await asyncio.gather(ingress.start(), notifier.start())
        async with Client(ingress.url, KEY_ID, SECRET) as client:
            yield Stack(client, notifier, prefix)
    finally:
        await asyncio.gather(notifier.stop(), ingress.stop(), engine.stop())


async def subscribe(client: Client, url: str, **filter_: Any) -> str:
    body = {"url": url, "secret": SUB_SECRET, "filter": filter_}
    answer = await client.request("POST", "/v1/subscriptions", msgspec.json.encode(body))
    assert answer.status == 201, answer.body
    assert "secret" not in answer.body
    return str(answer.body["id"])


async def deposits(client: Client, accounts: list[str], per_account: int, tag: str) -> list[str]:
    """per_account deposits to each account, interleaved; their command ids in order."""
    commands = [
        {"kind": "deposit", "command_id": f"{tag}-{a}-{i}", "account": a, "asset": "USD",
         "amount": i + 1}
        for i in range(per_account) for a in accounts
    ]  # fmt: skip
    answer = await client.submit_batch(commands)
    assert answer.status == 202, answer.body
    return [c["command_id"] for c in commands]


async def until(
    check: Callable[[], Awaitable[bool] | bool], what: str, limit_s: float = 60
) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        outcome = check()
        if isinstance(outcome, Awaitable):
            outcome = await outcome
        if outcome:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {limit_s}s: {what}")


def in_order_per_account(acked: list[dict[str, Any]]) -> bool:
    """Acknowledged deliveries of each account arrive in seq order (first ack of each)."""
    seen: set[str] = set()
    last: dict[str, int] = {}
    for body in acked:
        if body["delivery_id"] in seen:
            continue
        seen.add(body["delivery_id"])
        event = body["event"]
        seq = event["entries"][0]["seq"]
        if seq <= last.get(event["account"], 0):
            return False
        last[event["account"]] = seq
    return True


async def metric(notifier: NotifyProcess, name: str) -> float:
    url = f"http://127.0.0.1:{notifier.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def test_every_matching_event_reaches_the_working_receivers_in_order_per_account(
    stack: Stack,
) -> None:
    ok, flaky, hang = Receiver("ok"), Receiver("flaky", failures=8), Receiver("hang")
    down = Receiver("ok")  # never started: connections are refused
    for r in (ok, flaky, hang):
        await r.start()
    try:
        tag = uuid.uuid4().hex[:6]
        prefix = f"acct-{tag}-"
        subs = {}
        for name, r in (("ok", ok), ("flaky", flaky), ("hang", hang), ("down", down)):
            subs[name] = await subscribe(stack.client, r.url, account_prefixes=[prefix])
        # Another account outside the filter: never delivered.
        await deposits(stack.client, [f"other-{tag}"], 3, tag)
        accounts = [f"{prefix}{i}" for i in range(5)]
        ids = await deposits(stack.client, accounts, 4, tag)

        await until(lambda: len(ok.delivered()) == len(ids), "all delivered to ok")
        # The hanging receiver holds none of it up: it has acknowledged nothing.
        assert not hang.acked
        await until(lambda: len(flaky.delivered()) == len(ids), "all delivered to flaky")
        for r in (ok, flaky):
            assert {b["command_id"] for b in r.acked} == set(ids)
            assert in_order_per_account(r.acked)
            assert r.bad_signatures == 0
        assert len(flaky.requests) > len(ids)  # the 500s were retried
        assert await metric(stack.notifier, "tally_notify_retries_total") > 0

        # The dead one is retried up to the horizon, then parked, every delivery.
        async def parked() -> bool:
            target = f"/v1/subscriptions/{subs['down']}/deliveries?status=failed&limit=500"
            answer = await stack.client.request("GET", target)
            assert answer.status == 200, answer.body
            return {d["command_id"] for d in answer.body["deliveries"]} == set(ids)

        await until(parked, "every delivery to the dead receiver parked", 120)
        failed = await metric(stack.notifier, 'tally_notify_deliveries_total{outcome="failed"}')
        assert failed >= len(ids)
        # The hanging one got attempts (each timed out), and is bounded by the horizon too.
        assert hang.requests
    finally:
        for r in (ok, flaky, hang):
            await r.stop()


async def test_filters_by_status_and_kind(stack: Stack) -> None:
    r = Receiver("ok")
    await r.start()
    try:
        tag = uuid.uuid4().hex[:6]
        account = f"f-{tag}"
        await subscribe(stack.client, r.url, accounts=[account], statuses=["rejected"],
                        kinds=["withdraw"])  # fmt: skip
        commands = [
            {"kind": "deposit", "command_id": f"{tag}-d", "account": account, "asset": "USD",
             "amount": 5},
            {"kind": "withdraw", "command_id": f"{tag}-w1", "account": account, "asset": "USD",
             "amount": 3},
            {"kind": "withdraw", "command_id": f"{tag}-w2", "account": account, "asset": "USD",
             "amount": 30},
        ]  # fmt: skip
        assert (await stack.client.submit_batch(commands)).status == 202
        await until(lambda: bool(r.acked), "the rejected withdrawal delivered")
        await asyncio.sleep(1)
        assert [b["command_id"] for b in r.acked] == [f"{tag}-w2"]
        assert r.acked[0]["event"]["reason"] == "insufficient_funds"
    finally:
        await r.stop()


async def test_pause_holds_deliveries_and_resume_delivers_them(stack: Stack) -> None:
    r = Receiver("ok")
    await r.start()
    try:
        tag = uuid.uuid4().hex[:6]
        sub = await subscribe(stack.client, r.url, account_prefixes=[f"p-{tag}"])
        paused = await stack.client.request("POST", f"/v1/subscriptions/{sub}/pause", **JSON)
        assert paused.status == 200 and paused.body["paused"] is True
        await asyncio.sleep(0.6)  # the notifier sees the pause at its next refresh
        ids = await deposits(stack.client, [f"p-{tag}"], 3, tag)
        await asyncio.sleep(1.5)
        assert not r.acked
        resumed = await stack.client.request("POST", f"/v1/subscriptions/{sub}/resume", **JSON)
        assert resumed.status == 200 and resumed.body["paused"] is False
        await until(lambda: {b["command_id"] for b in r.acked} == set(ids), "after resume")
        listed = await stack.client.request("GET", "/v1/subscriptions")
        assert sub in {s["id"] for s in listed.body["subscriptions"]}
        assert all("secret" not in s for s in listed.body["subscriptions"])
        gone = await stack.client.request("DELETE", f"/v1/subscriptions/{sub}", **JSON)
        assert gone.status == 204
        again = await stack.client.request("GET", f"/v1/subscriptions/{sub}")
        assert again.status == 404 and again.body["field"] == "subscription_id"
    finally:
        await r.stop()


async def test_a_time_range_is_redelivered_on_request(stack: Stack) -> None:
    r = Receiver("ok")
    await r.start()
    try:
        tag = uuid.uuid4().hex[:6]
        sub = await subscribe(stack.client, r.url, account_prefixes=[f"r-{tag}"])
        since_ms = int(time.time() * 1000)
        ids = await deposits(stack.client, [f"r-{tag}-a", f"r-{tag}-b"], 4, tag)
        await until(lambda: {b["command_id"] for b in r.acked} == set(ids), "first delivery")
        first = r.delivered()
        window = {"from_ms": since_ms, "to_ms": int(time.time() * 1000)}
        answer = await stack.client.request(
            "POST", f"/v1/subscriptions/{sub}/redeliver", msgspec.json.encode(window)
        )
        assert answer.status == 202, answer.body
        await until(lambda: len(r.acked) == 2 * len(ids), "every event again")
        # The same events: the same delivery ids, each twice, in order per account again.
        assert r.delivered() == first
        assert in_order_per_account(r.acked[len(ids) :])
        backwards = {"from_ms": 10, "to_ms": 5}
        refused = await stack.client.request(
            "POST", f"/v1/subscriptions/{sub}/redeliver", msgspec.json.encode(backwards)
        )
        assert refused.status == 422 and refused.body["field"] == "to_ms"
    finally:
        await r.stop()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://127.0.0.1/x"}, "url"),
        ({"url": "http://user:pw@127.0.0.1/x"}, "url"),
        ({"url": "http:///x"}, "url"),
        ({"url": "http://127.0.0.1/x", "secret": "short"}, "secret"),
        ({"url": "http://127.0.0.1/x", "filter": {"statuses": ["won"]}}, "filter.statuses[0]"),
        ({"url": "http://127.0.0.1/x", "filter": {"kinds": ["steal"]}}, "filter.kinds[0]"),
        ({"url": "http://127.0.0.1/x", "filter": {"accounts": ["a b"]}}, "filter.accounts[0]"),
        ({"url": "http://127.0.0.1/x", "filter": {"colour": ["red"]}}, "filter.colour"),
        ({"url": "http://127.0.0.1/x", "extra": 1}, "extra"),
        ({"secret": SUB_SECRET}, "url"),
        ({"url": 7}, "url"),
        (b'{"url": "https://hooks.example.com/x", "url": "http://127.0.0.1/x"}', "url"),
        (
            b'{"url": "http://127.0.0.1/x", "filter": {"kinds": [], "kinds": ["deposit"]}}',
            "filter.kinds",
        ),
        ({"url": "http://127.0.0.1/x", "filter": {"accounts": ["a"] * 101}}, "filter.accounts"),
        ({"url": "http://127.0.0.1/x", "secret": "sixteen-chars-ok\n-but-a-newline"}, "secret"),
        (b"[1, 2]", "body"),
        (b"{", "body"),
    ],
)
async def test_bad_subscription_input_is_a_4xx_naming_the_field(
    stack: Stack, body: dict[str, Any] | bytes, field: str
) -> None:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    answer = await stack.client.request("POST", "/v1/subscriptions", raw)
    assert 400 <= answer.status < 500, answer.body
    assert answer.body["field"] == field, answer.body


async def test_unsigned_subscription_calls_are_refused(stack: Stack) -> None:
    async with Client(stack.client.base_url) as anonymous:
        answer = await anonymous.request("GET", "/v1/subscriptions")
    assert answer.status == 401


async def test_the_notifier_answers_livez_readyz_and_metrics(stack: Stack) -> None:
    body = await stack.notifier.readyz()
    assert body["ready"] is True and body["partitions"] == list(range(PARTITIONS))
    url = f"http://127.0.0.1:{stack.notifier.port}/livez"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
    assert await metric(stack.notifier, "tally_notify_subscriptions") >= 0


async def test_lane_offsets_only_move_forward_and_not_for_a_deleted_subscription(
    settings: Settings, stack: Stack
) -> None:
    conn = await asyncpg.connect(
        settings.pg_dsn, server_settings={"search_path": quote(stack.prefix)}
    )
    try:
        sub = await subscribe(stack.client, "http://127.0.0.1:9/none", accounts=["nobody"])
        topic = f"{stack.prefix}.events"
        await store.save_lanes_done(conn, topic, 4, {(sub, 0, 1): 50, (sub, 2, 3): 7})
        # A stale writer (another notifier, an older batch) cannot move an offset back.
        await store.save_lanes_done(conn, topic, 4, {(sub, 0, 1): 20, (sub, 2, 3): 8})
        assert await store.lanes_done(conn, sub, topic, 4) == {(0, 1): 50, (2, 3): 8}
        assert await store.lanes_done(conn, sub, topic, 3) == {}  # of another lane count
        gone = await stack.client.request("DELETE", f"/v1/subscriptions/{sub}", **JSON)
        assert gone.status == 204
        assert await store.lanes_done(conn, sub, topic, 4) == {}  # deleted with it
        # A batch holding a deleted subscription's lanes stores the others, and no error.
        alive = await subscribe(stack.client, "http://127.0.0.1:9/none", accounts=["nobody"])
        await store.save_lanes_done(conn, topic, 4, {(sub, 0, 1): 60, (alive, 1, 0): 3})
        assert await store.lanes_done(conn, sub, topic, 4) == {}
        assert await store.lanes_done(conn, alive, topic, 4) == {(1, 0): 3}
    finally:
        await conn.close()


async def test_a_reader_that_fails_to_start_is_started_again(
    settings: Settings, stack: Stack
) -> None:
    """A PostgreSQL error at a reader's start (here: the lanes' table is away for a
    while) does not leave that subscription without deliveries until a restart."""
    r = Receiver("ok")
    await r.start()
    conn = await asyncpg.connect(
        settings.pg_dsn, server_settings={"search_path": quote(stack.prefix)}
    )
    try:
        await conn.execute("ALTER TABLE subscription_lanes RENAME TO subscription_lanes_away")
        try:
            tag = uuid.uuid4().hex[:6]
            await subscribe(stack.client, r.url, accounts=[f"s-{tag}"])
            await asyncio.sleep(1.5)  # the notifier's refreshes start its reader: it fails
        finally:
            await conn.execute("ALTER TABLE subscription_lanes_away RENAME TO subscription_lanes")
        ids = await deposits(stack.client, [f"s-{tag}"], 3, tag)
        await until(lambda: {b["command_id"] for b in r.acked} == set(ids), "delivered", 30)
    finally:
        await conn.close()
        await r.stop()
