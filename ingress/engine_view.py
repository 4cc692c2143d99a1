"""Strongly consistent reads: the owning engine worker's table view of an account,
through the interface the engine publishes for that (`streams.client`: which worker
owns a shard, and the URL of an account there). The ingress knows nothing else of the
engine."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiokafka.errors import KafkaError

from core.settings import Settings
from ingress.connections import Connections
from ingress.problems import Problem
from streams.client import ShardOwners, account_url
from topics.names import deployment_topics, engine_group

# Finding a shard's owner asks Kafka for the engine group's description.
owner_timeout_s = 4.0


class EngineView:
    def __init__(self, settings: Settings, connections: Connections) -> None:
        self.owners = ShardOwners(
            settings.kafka_bootstrap,
            engine_group(settings),
            deployment_topics(settings).commands.name,
        )
        self.connections = connections

    async def account(self, account: str, shard: int) -> dict[str, Any]:
        """The owning worker's view of the account: its status and, per asset,
        available, held, seq and overdraft limit; 503 when no worker answers."""
        http = self.connections.http
        assert http is not None
        try:
            owner = await asyncio.wait_for(self.owners.of(shard), owner_timeout_s)
        except (KafkaError, OSError, TimeoutError):
            owner = None
        if owner is None:
            raise Problem(
                503,
                "engine unavailable",
                f"no engine worker serves shard {shard} right now",
                field="engine",
                headers={"Retry-After": "1"},
            )
        try:
            async with http.get(account_url(owner, account)) as response:
                body = await response.json() if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            body = None
        if body is None:
            self.owners.forget()
            raise Problem(
                503,
                "engine unavailable",
                f"the worker serving shard {shard} did not answer",
                field="engine",
                headers={"Retry-After": "1"},
            )
        view: dict[str, Any] = body
        return view

    async def balances(self, account: str, shard: int) -> dict[str, dict[str, int]]:
        """Each asset's available, held and seq, from the owning worker."""
        balances = (await self.account(account, shard))["balances"]
        return {
            asset: {k: b[k] for k in ("available", "held", "seq")} for asset, b in balances.items()
        }
