"""The read routes: a command's recorded result, an account's balances (cached in Redis,
strong from the engine, or as they were from PostgreSQL), its history and details, and
the commands carrying a reference. The queries are in `ingress.reads`."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from core.http import json_response
from core.settings import Settings
from ingress import reads
from ingress.admission import Admission
from ingress.checks import check_account, no_query, postgres, query_once
from ingress.connections import Connections
from ingress.engine_view import EngineView
from ingress.problems import Problem
from sinks import redis_client
from sinks.redis_store import assets_key, balance_key
from topics import limits
from topics.shard import shard_of

_COMMAND_ID = re.compile(limits.COMMAND_ID_PATTERN)
_COMMAND_SQL = """
SELECT shard_id, command_id, account, kind, status, reason,
       (extract(epoch FROM at) * 1000)::bigint AS at_ms, reference, metadata::text AS metadata
FROM command_results
WHERE shard_id = ANY($1::int[]) AND command_id = $2
ORDER BY shard_id
LIMIT 2
"""


class Reads:
    """The read handlers of one ingress process (routed in `ingress.app`)."""

    def __init__(
        self,
        settings: Settings,
        connections: Connections,
        admission: Admission,
        engine: EngineView,
    ) -> None:
        self.partitions = settings.partitions
        self.prefix = settings.topic_prefix
        self.connections = connections
        self.admission = admission
        self.engine = engine

    def _account(self, request: web.Request) -> tuple[str, int]:
        """The account of the path, checked, and its shard."""
        account = request.match_info["account"]
        check_account(account)
        return account, shard_of(account, self.partitions)

    async def get_command(self, request: web.Request) -> web.Response:
        await self.admission.admit(request)
        no_query(request, ("account",))
        command_id = request.match_info["command_id"]
        if not _COMMAND_ID.match(command_id):
            raise Problem(
                400, "invalid command id", "1-128 characters of A-Z a-z 0-9 _ . : -",
                field="command_id",
            )  # fmt: skip
        account = request.query.get("account")
        if account is not None:
            check_account(account)
            shards = [shard_of(account, self.partitions)]
        else:
            shards = list(range(self.partitions))
        rows = await postgres(self.connections.pg.fetch(_COMMAND_SQL, shards, command_id))
        if account is not None:
            rows = [row for row in rows if row["account"] == account]
        if not rows:
            raise Problem(
                404,
                "no result yet",
                "no result is recorded for this command id (not applied yet, or unknown)",
                field="command_id",
            )
        if len(rows) > 1:
            raise Problem(
                409,
                "command id used by several accounts",
                "name the account: ?account=...",
                field="account",
            )
        return json_response(reads.command_row(rows[0]))

    async def get_balances(self, request: web.Request) -> web.Response:
        if "at" in request.query or "seq" in request.query:
            return await self.get_balances_at(request)
        await self.admission.admit(request)
        no_query(request, ("consistency",))
        account, shard = self._account(request)
        consistency = request.query.get("consistency", "cached")
        if consistency not in ("cached", "strong"):
            raise Problem(
                400, "invalid consistency", "cached (default) or strong", field="consistency"
            )
        if consistency == "strong":
            balances = await self.engine.balances(account, shard)
        else:
            balances = await self._cached(account, shard)
        return json_response(
            {
                "account": account,
                "shard_id": shard,
                "consistency": consistency,
                "balances": balances,
            }
        )

    async def _cached(self, account: str, shard: int) -> dict[str, dict[str, int]]:
        redis = self.connections.redis
        try:
            raw_assets = await redis.smembers(assets_key(self.prefix, shard, account))
            assets = sorted(a.decode() for a in raw_assets)
            async with redis.pipeline(transaction=False) as pipe:
                for asset in assets:
                    key = balance_key(self.prefix, shard, account, asset)
                    pipe.hmget(key, "available", "held", "seq")
                rows = await pipe.execute()
        except redis_client.ERRORS as exc:
            raise Problem(
                503, "Redis unavailable", type(exc).__name__, field="redis",
                headers={"Retry-After": "2"},
            ) from None  # fmt: skip
        return {
            asset: {"available": int(row[0]), "held": int(row[1]), "seq": int(row[2])}
            for asset, row in zip(assets, rows, strict=True)
            if None not in row
        }

    async def get_commands(self, request: web.Request) -> web.Response:
        """`GET /v1/commands?reference=...`: the commands carrying a reference."""
        await self.admission.admit(request)
        query_once(request, ("reference",))
        reference = reads.parse_reference(request.query.get("reference"))
        pool = self.connections.pg
        return json_response(await postgres(reads.commands_by_reference(pool, reference)))

    async def get_entries(self, request: web.Request) -> web.Response:
        """One page of a balance's history, oldest first, with a `next` link."""
        await self.admission.admit(request)
        query = request.query
        query_once(request, ("asset", "after_seq", "before_seq", "limit"))
        account, shard = self._account(request)
        asset = reads.parse_asset(query.get("asset"), required=True)
        assert asset is not None
        after_seq = reads.parse_seq(query.get("after_seq"), "after_seq") or 0
        before_seq = reads.parse_seq(query.get("before_seq"), "before_seq", least=1)
        limit = reads.parse_limit(query.get("limit"))
        page = reads.history(
            self.connections.pg,
            shard=shard,
            account=account,
            asset=asset,
            after_seq=after_seq,
            before_seq=before_seq,
            limit=limit,
        )
        return json_response(await postgres(page))

    async def get_balances_at(self, request: web.Request) -> web.Response:
        """`?at=<time>` (every asset, or `asset`) or `?seq=N&asset=X`: a past balance."""
        await self.admission.admit(request)
        query = request.query
        query_once(request, ("at", "seq", "asset"))
        account, shard = self._account(request)
        body: dict[str, Any] = {"account": account, "shard_id": shard}
        if "at" in query and "seq" in query:
            raise Problem(400, "at and seq", "give one of at and seq", field="seq")
        pool = self.connections.pg
        if "seq" in query:
            asset = reads.parse_asset(query.get("asset"), required=True)
            assert asset is not None
            seq = reads.parse_seq(query.get("seq"), "seq")
            assert seq is not None
            balance = reads.balance_at_seq(pool, shard=shard, account=account, asset=asset, seq=seq)
            body["seq"] = seq
            body["balances"] = {asset: await postgres(balance)}
        else:
            asset = reads.parse_asset(query.get("asset"), required=False)
            at_ms = reads.parse_time(query["at"])
            balances = reads.balances_at_time(
                pool, shard=shard, account=account, asset=asset, at_ms=at_ms
            )
            body["at_ms"] = at_ms
            body["balances"] = await postgres(balances)
        body["consistency"] = "projection"
        return json_response(body)

    async def get_account(self, request: web.Request) -> web.Response:
        """Status, overdraft limits, assets and last seqs, from the owning worker."""
        await self.admission.admit(request)
        no_query(request)
        account, shard = self._account(request)
        view = await self.engine.account(account, shard)
        balances = view["balances"]
        return json_response(
            {
                "account": account,
                "shard_id": shard,
                "consistency": "strong",
                "status": view.get("status", "active"),
                "assets": sorted(balances),
                "overdraft_limits": {
                    a: b.get("overdraft_limit", 0) for a, b in sorted(balances.items())
                },
                "last_seq": {a: b["seq"] for a, b in sorted(balances.items())},
            }
        )
