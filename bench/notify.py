"""`tally bench notify`: deliveries per second from `tally notify` to a fast local
receiver, and the event-to-delivery latency at a paced rate.

Method. A fresh deployment gets one subscription (no filter) to an aiohttp receiver on
loopback that answers 200 at once, and a notifier runs in this process with its default
settings (4 lanes) except that loopback targets are allowed. N synthetic result events
(one entry each, over N/20 accounts) are produced to the events topic; throughput is N
over the time from the first delivery the receiver gets to the N-th distinct one. Then
paced events (200/s for 10 s) carry their send time as `at_ms`: an event's latency is
from that send to the receiver's getting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
from aiohttp import web

from bench.events import result_events
from bench.report import BenchError, pct, show, write_report
from core.settings import Settings
from harness.procs import free_port, produce
from harness.scratch import deployment, unique_prefix
from notify import store
from notify.rules import Filter
from notify.service import Notifier
from topics.codec import encode
from topics.schema import Entry, Result, Status
from topics.specs import topics_for

paced_rate_per_s = 200
paced_seconds = 10
drain_timeout_s = 600.0


class _Receiver:
    def __init__(self) -> None:
        self.seen: dict[str, float] = {}  # delivery id -> first receipt (time.time())
        self.lags_ms: list[float] = []

    async def hook(self, request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read())
        now = time.time()
        if body["delivery_id"] not in self.seen:
            self.seen[body["delivery_id"]] = now
            if body["command_id"].startswith("paced-"):
                self.lags_ms.append(now * 1000 - body["event"]["at_ms"])
        return web.Response(status=200)


async def _wait_for(check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise BenchError("the notifier did not deliver everything in time")
        await asyncio.sleep(0.02)


async def run(
    settings: Settings, *, count: int, report: Path, say: Callable[[str], None] = print
) -> dict[str, object]:
    scratch = deployment(settings, unique_prefix("bench-notify"), topics="deployment", schema=True)
    prefix = scratch.prefix
    local = msgspec.structs.replace(
        scratch.settings, notify_allow_private=True, notify_port=free_port()
    )
    topics = topics_for(prefix, local.partitions)
    await scratch.create()
    receiver = _Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    notifier = Notifier(local)
    task = asyncio.create_task(notifier.run())
    try:
        await asyncio.sleep(1)  # the schema and the pool
        sub = store.Subscription(
            id="sub_" + uuid.uuid4().hex, url=f"http://127.0.0.1:{port}/hook",
            secret="bench-secret-0123456789", filter=Filter(), paused=False,
            created_at_ms=int(time.time() * 1000) - 1000,
        )  # fmt: skip
        assert notifier.pool is not None
        await store.create(notifier.pool, sub)
        accounts = max(100, count // 20)
        say(f"[notify] {count:,} result events over {accounts:,} accounts to {prefix}.events")
        events = result_events(count, accounts, int(time.time() * 1000))
        await produce(local.kafka_bootstrap, topics.events.name, [(k, v, None) for k, v in events])
        await _wait_for(lambda: len(receiver.seen) >= count, drain_timeout_s)
        times = sorted(receiver.seen.values())
        rate = (count - 1) / max(1e-9, times[-1] - times[0])
        say(f"[notify] paced {paced_rate_per_s}/s for {paced_seconds}s")
        await _paced(local.kafka_bootstrap, topics.events.name)
        total = count + paced_rate_per_s * paced_seconds
        await _wait_for(lambda: len(receiver.seen) >= total, 120)
    finally:
        notifier.stop()
        with contextlib.suppress(Exception):
            await task
        await runner.cleanup()
        await scratch.drop()
    out: dict[str, object] = {
        "events": count,
        "partitions": local.partitions,
        "concurrency": local.notify_concurrency,
        "deliveries_per_s": rate,
        "latency_p50_ms": pct(receiver.lags_ms, 50),
        "latency_p99_ms": pct(receiver.lags_ms, 99),
        "latency_samples": len(receiver.lags_ms),
    }
    await asyncio.to_thread(write_report, report, out)
    line = (
        f"notify: {rate:,.0f} deliveries/s to one fast receiver "
        f"({local.notify_concurrency} lanes); event-to-delivery at {paced_rate_per_s}/s: "
        f"p50 {out['latency_p50_ms']:.1f} ms, p99 {out['latency_p99_ms']:.1f} ms "
        f"({len(receiver.lags_ms)} samples)"
    )
    show(say, [line], report)
    return out


async def _paced(bootstrap: str, topic: str) -> None:
    from topics.producer import durable_producer

    producer = durable_producer(bootstrap)
    await producer.start()
    try:
        gap_s = 1 / paced_rate_per_s
        for i in range(paced_rate_per_s * paced_seconds):
            account = f"paced-{i % 50}"
            now_ms = int(time.time() * 1000)
            entry = Entry(account=account, asset="USD", seq=i // 50 + 1, available=i,
                          held=0, delta_available=1, delta_held=0)  # fmt: skip
            result = Result(command_id=f"paced-{i}", account=account, kind="deposit",
                            status=Status.APPLIED, entries=[entry], at_ms=now_ms)  # fmt: skip
            await producer.send(topic, encode(result), key=account.encode())
            await asyncio.sleep(gap_s)
        await producer.flush()
    finally:
        await producer.stop()
