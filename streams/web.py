"""The worker's own HTTP server: the table view of balances, liveness and readiness.

`GET /balances/{account}` answers from the RocksDB of the worker that owns the account's
shard, with what its committed batches have applied. A worker that does not own the
shard asks Kafka which member of the engine's consumer group does (the group's
description carries each member's assignment and client id, and the client id carries
the member's web address) and forwards the request there, once.
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import quote

import aiohttp
import yarl
from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocol

from streams.engine import Engine
from topics import limits
from topics.shard import shard_of

CLIENT_ID_PREFIX = "tally-engine-"
owners_ttl_s = 2.0
forward_timeout_s = 5.0
_ACCOUNT = re.compile(limits.ACCOUNT_ID_PATTERN)


def client_id_for(host: str, port: int) -> str:
    """The consumer client id that tells other workers where this one's web server is."""
    return f"{CLIENT_ID_PREFIX}{host}-{port}"


def _address_of(client_id: str) -> str | None:
    if not client_id.startswith(CLIENT_ID_PREFIX):
        return None
    host, _, port = client_id[len(CLIENT_ID_PREFIX) :].rpartition("-")
    return f"http://{host}:{port}" if host and port.isdigit() else None


def _problem(
    status: int, title: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    """An RFC 9457 problem; `extra` goes into the body, `headers` onto the response."""
    return web.json_response(
        {"type": "about:blank", "title": title, "status": status, **extra},
        status=status,
        content_type="application/problem+json",
        headers=headers,
    )


def account_url(owner: str, account: str) -> yarl.URL:
    """The owner's table view of `account`, marked as forwarded. Encoded by hand: an
    account id may be "." or "..", which a URL library would resolve as a path step."""
    segment = quote(account, safe="").replace(".", "%2E")
    return yarl.URL(f"{owner}/balances/{segment}?forwarded=1", encoded=True)


class ShardOwners:
    """Which engine worker serves which shard, from the engine group's description in
    Kafka, cached for `owners_ttl_s` (forgotten when an owner stops answering)."""

    def __init__(self, bootstrap: str, group_id: str, commands_topic: str) -> None:
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.commands_topic = commands_topic
        self._owners: dict[int, str] = {}
        self._at = 0.0

    async def of(self, shard: int) -> str | None:
        """The web address of the worker assigned `shard`, or None if nobody is."""
        if time.monotonic() - self._at > owners_ttl_s:
            self._owners = await self._describe()
            self._at = time.monotonic()
        return self._owners.get(shard)

    def forget(self) -> None:
        self._at = 0.0

    async def _describe(self) -> dict[int, str]:
        """shard -> web address of the group member assigned the shard's commands."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            responses = await admin.describe_consumer_groups([self.group_id])
        finally:
            await admin.close()
        owners: dict[int, str] = {}
        for response in responses:
            for group in response.groups:
                for member in group[5]:
                    client_id, raw_assignment = member[1], member[-1]
                    address = _address_of(client_id)
                    if address is None or not raw_assignment:
                        continue
                    assignment = ConsumerProtocol.ASSIGNMENT.decode(raw_assignment)
                    for topic, partitions in assignment.assignment:
                        if topic == self.commands_topic:
                            owners.update(dict.fromkeys(partitions, address))
        return owners


class WorkerWeb:
    def __init__(self, engine: Engine, host: str, port: int) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self.address = f"http://{host}:{port}"
        self._owners = ShardOwners(
            engine.settings.kafka_bootstrap, engine.group_id, engine.topics.commands.name
        )
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_get("/livez", self.livez)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/balances/{account}", self.balances)
        self.app.router.add_get("/balances/{account}/", self.balances)

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def livez(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        engine = self.engine
        body = {
            "ready": engine.ready,
            "serving": sorted(engine.owned),
            "recovering": sorted(engine.recovering),
            "counts": dict(engine.counts),
        }
        return web.json_response(body, status=200 if engine.ready else 503)

    async def balances(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        if not _ACCOUNT.match(account):
            return _problem(
                400,
                "invalid account id",
                field="account",
                detail="1-64 characters of A-Z a-z 0-9 _ . : -",
            )
        engine = self.engine
        shard = shard_of(account, engine.partitions)
        if engine.owns(account):
            balances = engine.balances_of(account)
            return web.json_response(
                {
                    "account": account,
                    "shard_id": shard,
                    "balances": {
                        asset: {"available": b.available, "held": b.held, "seq": b.seq}
                        for asset, b in balances.items()
                    },
                }
            )
        owner = None if "forwarded" in request.query else await self._owner(shard)
        if owner is None or owner == self.address:
            return _problem(
                503,
                "shard not served right now",
                detail=f"no worker serves shard {shard} yet (starting or rebalancing)",
                shard_id=shard,
                headers={"Retry-After": "1"},
            )
        url = account_url(owner, account)
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
            return _problem(
                503,
                "owner unreachable",
                detail=f"{owner} did not answer",
                headers={"Retry-After": "1"},
            )

    async def _owner(self, shard: int) -> str | None:
        return await self._owners.of(shard)
