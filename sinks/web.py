"""A sink's own HTTP server: liveness, readiness and Prometheus metrics.

`/livez` answers while the process runs. `/readyz` answers 200 only when the sink can do
its job now: its store answers a ping on a connection of its own, no outage is being
waited out, and the consumer has partitions assigned; 503 with the failing checks
otherwise. `/metrics` follows the engine's conventions (`tally_engine_*`): the
`tally_sink_` prefix, a `target` label (postgres or redis), counters ending in
`_total`, per-partition gauges labelled `topic` and `partition`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.http import WebServer, json_response, livez
from sinks.runner import SinkRunner

# A probe answers within this (Kubernetes' default probe timeout is 1 s; ours are 2 s).
ping_timeout_s = 1.5
write_buckets_s = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _SinkCollector(Collector):
    """The runner's counters and the last computed lag and readiness, read at each scrape."""

    def __init__(self, web: SinkWeb) -> None:
        self.web = web

    def collect(self) -> Iterator[Metric]:
        runner, target = self.web.runner, self.web.target
        yield _gauge(
            "tally_sink_ready",
            "1 when the store answers and partitions are assigned (as /readyz).",
            target,
            int(self.web.last_ready),
        )
        yield _gauge(
            "tally_sink_store_down",
            "1 while the sink waits out a store outage.",
            target,
            int(runner.down_since is not None),
        )
        lag = GaugeMetricFamily(
            "tally_sink_partition_lag",
            "Events on an assigned partition of the events topic not yet written.",
            labels=["target", "topic", "partition"],
        )
        for partition, waiting in sorted(self.web.last_lag.items()):
            lag.add_metric([target, runner.topic, str(partition)], waiting)
        yield lag
        for name, help_text, value in (
            ("tally_sink_batches", "Batches written.", runner.batches),
            ("tally_sink_events", "Events written.", runner.written_events),
            ("tally_sink_entries", "Balance entries written.", runner.written_entries),
            ("tally_sink_outages", "Store outages waited out (or being).", runner.outages),
            ("tally_sink_rebuilds", "Times the store lost data and was rebuilt.", runner.rebuilds),
            ("tally_sink_dead_letters", "Events dead-lettered.", runner.dead_lettered),
        ):  # fmt: skip
            counter = CounterMetricFamily(name, help_text, labels=["target"])
            counter.add_metric([target], value)
            yield counter


def _gauge(name: str, help_text: str, target: str, value: int) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=["target"])
    family.add_metric([target], value)
    return family


class SinkWeb:
    """The server beside one sink runner (one per sink process)."""

    def __init__(self, runner: SinkRunner, target: str, host: str, port: int) -> None:
        self.runner = runner
        self.target = target
        self.host = host
        self.port = port
        self.last_ready = False
        self.last_lag: dict[int, int] = {}
        # The *_created series double the output and nobody graphs them (as the ingress).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self.registry.register(_SinkCollector(self))
        self.write_seconds = Histogram(
            "tally_sink_write_duration_seconds",
            "Time to write one batch to the store, retries of an outage included.",
            ["target"],
            buckets=write_buckets_s,
            registry=self.registry,
        ).labels(target)
        runner.on_write = self.write_seconds.observe
        self.app = web.Application()
        self.app.router.add_get("/livez", livez, allow_head=False)
        self.app.router.add_get("/readyz", self.readyz, allow_head=False)
        self.app.router.add_get("/metrics", self.metrics, allow_head=False)
        self._server = WebServer(self.app, host, port)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    async def checks(self) -> dict[str, str]:
        """Each readiness check: "ok" or why not."""
        runner = self.runner
        store = "ok"
        if runner.down_since is not None:
            store = "unavailable (the sink is retrying it)"
        elif (ping := getattr(runner.store, "ping", None)) is not None:
            # Both stores ping; a wrapped store (a replay's) has no server of its own.
            try:
                await asyncio.wait_for(ping(ping_timeout_s), ping_timeout_s + 0.5)
            except Exception as error:  # any failure to answer is "not ready"
                store = f"unavailable ({type(error).__name__})"
        assigned = runner.assigned()
        consumer = "ok" if assigned else "no partitions assigned"
        self.last_ready = store == "ok" and consumer == "ok"
        return {"store": store, "consumer": consumer}

    async def readyz(self, request: web.Request) -> web.Response:
        checks = await self.checks()
        body = {
            "ready": self.last_ready,
            "target": self.target,
            "checks": checks,
            "partitions": self.runner.assigned(),
        }
        return json_response(body, 200 if self.last_ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text: readiness, lag per partition, counters, write latency."""
        await self.checks()
        self.last_lag = await self.runner.partition_lag()
        return web.Response(
            body=generate_latest(self.registry), content_type="text/plain", charset="utf-8"
        )
