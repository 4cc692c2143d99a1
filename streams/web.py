"""The worker's own HTTP server: the table view of balances, liveness and readiness.

`GET /balances/{account}` answers from the RocksDB of the worker that owns the account's
shard, with what its committed batches have applied. A worker that does not own the
shard asks Kafka which member of the engine's consumer group does (the group's
description carries each member's assignment and client id, and the client id carries
the member's web address) and forwards the request there, once.

`GET /shards/{shard}/balances?after=<account>/<asset>&limit=N` pages through one shard's
committed balances in RocksDB key order (bytes of `account|asset`), for `tally audit`;
it is answered, or forwarded, the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import aiohttp
import msgspec
import yarl
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.http import WebServer, livez, problem_response
from streams.client import (
    BalanceRow,
    ShardOwners,
    ShardPage,
    account_url,
    shard_page_limit_max,
)
from streams.engine import Engine
from streams.store import ShardStore
from topics import limits
from topics.shard import shard_of

forward_timeout_s = 5.0
_ACCOUNT = re.compile(limits.ACCOUNT_ID_PATTERN)
_ASSET = re.compile(limits.ASSET_PATTERN)
shard_page_limit_default = 1000


def balance_page(
    store: ShardStore, after: tuple[str, str] | None, limit: int
) -> tuple[list[BalanceRow], str | None]:
    """Up to `limit` committed balances after the key of `after` (exclusive), and the
    cursor to continue from (None once the shard is done). RocksDB only: what the
    current batch has staged but not committed is not shown."""
    rows: list[BalanceRow] = []
    for account, asset, b in store.balances(after):
        if len(rows) == limit:
            last = rows[-1]
            return rows, f"{last.account}/{last.asset}"
        rows.append(BalanceRow(account, asset, b.available, b.held, b.seq))
    return rows, None


def _page_query(request: web.Request) -> tuple[tuple[str, str] | None, int] | web.Response:
    """`after` and `limit` of a shard page request, or the 400 that refuses them."""
    raw_limit = request.query.get("limit", str(shard_page_limit_default))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= shard_page_limit_max:
        return problem_response(400, "invalid limit", f"1-{shard_page_limit_max}", field="limit")
    raw_after = request.query.get("after")
    if raw_after is None:
        return None, int(raw_limit)
    account, _, asset = raw_after.partition("/")
    if not _ACCOUNT.match(account) or not _ASSET.match(asset):
        return problem_response(400, "invalid cursor", "<account>/<asset>", field="after")
    return (account, asset), int(raw_limit)


def _not_served(shard: int) -> web.Response:
    return problem_response(
        503,
        "shard not served right now",
        f"no worker serves shard {shard} yet (starting or rebalancing)",
        shard_id=shard,
        headers={"Retry-After": "1"},
    )


class _EngineCollector(Collector):
    """The engine's state as metric families, read at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        yield GaugeMetricFamily(
            "tally_engine_ready",
            "1 when every assigned shard has recovered and serves.",
            value=int(engine.ready),
        )
        shards = GaugeMetricFamily("tally_engine_shards", "Shards by state.", labels=["state"])
        shards.add_metric(["serving"], len(engine.owned))
        shards.add_metric(["recovering"], len(engine.recovering))
        yield shards
        progress = engine.progress()
        lag = GaugeMetricFamily(
            "tally_engine_partition_lag",
            "Records on a served partition not applied yet.",
            labels=["topic", "partition"],
        )
        stall = GaugeMetricFamily(
            "tally_engine_partition_stalled_seconds",
            "Seconds a served partition has had records waiting while its offset did not"
            " move (0: not stalled).",
            labels=["topic", "partition"],
        )
        for topic, partition, waiting, stalled_s in progress:
            lag.add_metric([topic, str(partition)], waiting)
            stall.add_metric([topic, str(partition)], round(stalled_s, 1))
        yield lag
        yield stall
        limit = engine.watchdog.stall_after_s
        yield GaugeMetricFamily(
            "tally_engine_stalled_partitions",
            f"Served partitions stalled for {limit:.0f}s or more: the watchdog's alarm.",
            value=sum(1 for *_, stalled_s in progress if stalled_s >= limit),
        )
        records = CounterMetricFamily(
            "tally_engine_records",
            "Records and outcomes counted by this worker since it started.",
            labels=["outcome"],
        )
        for name, value in sorted(engine.counts.items()):
            records.add_metric([name], value)
        yield records
        yield CounterMetricFamily(
            "tally_engine_commit_wait_seconds",
            "Time this worker waited for its transaction in flight with nothing to decide.",
            value=engine.loop.commit_wait_s,
        )


class WorkerWeb:
    def __init__(
        self, engine: Engine, host: str, port: int, *, advertised: str | None = None
    ) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self.address = f"http://{advertised or host}:{port}"
        self._owners = ShardOwners(
            engine.settings.kafka_bootstrap, engine.group_id, engine.topics.commands.name
        )
        self._registry = CollectorRegistry()
        self._registry.register(_EngineCollector(engine))
        self.app = web.Application()
        self.app.router.add_get("/livez", livez)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/balances/{account}", self.balances)
        self.app.router.add_get("/balances/{account}/", self.balances)
        self.app.router.add_get("/shards/{shard}/balances", self.shard_balances)
        self.app.router.add_get("/metrics", self.metrics)
        self._server = WebServer(self.app, host, port)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    async def readyz(self, request: web.Request) -> web.Response:
        engine = self.engine
        body = {
            "ready": engine.ready,
            "serving": sorted(engine.owned),
            "recovering": sorted(engine.recovering),
            "stalled": [
                f"{topic}[{partition}]"
                for topic, partition, _, stalled_s in engine.progress()
                if stalled_s >= engine.watchdog.stall_after_s
            ],
            "counts": dict(engine.counts),
            "commit_wait_s": round(engine.loop.commit_wait_s, 3),
        }
        return web.json_response(body, status=200 if engine.ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text: readiness, shards, per-partition lag and stall (the
        watchdog), and the engine's counters, computed when scraped."""
        return web.Response(
            body=generate_latest(self._registry), content_type="text/plain", charset="utf-8"
        )

    async def balances(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        if not _ACCOUNT.match(account):
            return problem_response(
                400, "invalid account id", "1-64 characters of A-Z a-z 0-9 _ . : -", field="account"
            )
        engine = self.engine
        shard = shard_of(account, engine.partitions)
        async with engine.reading():
            balances = engine.balances_of(account) if engine.owns(account) else None
            status = engine.status_of(account) if balances is not None else None
        if balances is not None:
            # The status and overdraft limits serve the ingress's GET /v1/accounts/{id}.
            return web.json_response(
                {
                    "account": account,
                    "shard_id": shard,
                    "status": status,
                    "balances": {
                        asset: {
                            "available": b.available,
                            "held": b.held,
                            "seq": b.seq,
                            "overdraft_limit": b.overdraft_limit,
                        }
                        for asset, b in balances.items()
                    },
                }
            )
        owner = None if "forwarded" in request.query else await self._owner(shard)
        if owner is None or owner == self.address:
            return _not_served(shard)
        return await self._forward(account_url(owner, account), owner)

    async def _owner(self, shard: int) -> str | None:
        return await self._owners.of(shard)

    async def shard_balances(self, request: web.Request) -> web.Response:
        """One page of a shard's balances in key order, from the shard's owner."""
        engine = self.engine
        raw_shard = request.match_info["shard"]
        if not raw_shard.isdigit() or int(raw_shard) >= engine.partitions:
            return problem_response(
                404, "no such shard", f"0-{engine.partitions - 1}", field="shard"
            )
        shard = int(raw_shard)
        query = _page_query(request)
        if isinstance(query, web.Response):
            return query
        after, limit = query
        async with engine.reading():
            page = None
            if shard in engine.owned and shard not in engine.recovering:
                page = balance_page(engine.stores[shard], after, limit)
        if page is not None:
            rows, cursor = page
            body = msgspec.json.encode(ShardPage(shard, rows, cursor))
            return web.Response(body=body, content_type="application/json")
        owner = None if "forwarded" in request.query else await self._owner(shard)
        if owner is None or owner == self.address:
            return _not_served(shard)
        url = yarl.URL(f"{owner}/shards/{shard}/balances").with_query(
            {**request.query, "forwarded": "1"}
        )
        return await self._forward(url, owner)

    async def _forward(self, url: yarl.URL, owner: str) -> web.Response:
        """The owner's answer to `url`, or 503 when it does not answer."""
        timeout = aiohttp.ClientTimeout(total=forward_timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url) as response,
            ):
                return web.Response(
                    body=await response.read(),
                    status=response.status,
                    content_type=response.content_type,
                )
        except (aiohttp.ClientError, TimeoutError):
            self._owners.forget()
            return problem_response(
                503,
                "owner unreachable",
                f"{owner} did not answer",
                headers={"Retry-After": "1"},
            )
