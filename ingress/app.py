"""The ingress: signed HTTP requests in, commands on Kafka out; balances and results out.

Order of checks on a request, so that each answer is the most useful one and nothing
is produced unless everything before it passed:
  what aiohttp's parser refuses (400/414/431, see ingress.protocol) -> size (413)
  -> repeated headers (400) -> body read in time (408) -> signature (401)
  -> rate limit (429) -> first use of the signature (401, or 503 when Redis cannot tell)
  -> content type (415) -> body and headers (400/422)
  -> produce (202 after the broker's ack, or 503).
A client that goes away while sending its body is counted, not answered.
An accepted command is in Kafka with acks=all from an idempotent producer; a 503 means
the broker did not confirm in time, and a retry with the same command_id is safe either
way (the engine answers a repeat as a duplicate of the first).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import asyncpg
import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import generate_latest

from core.settings import Settings, SettingsError
from ingress import reads, signing, subscriptions
from ingress.commands import IDEMPOTENCY_KEY, parse_batch, parse_command
from ingress.openapi import document
from ingress.problems import Problem
from ingress.ratelimit import TokenBuckets
from ingress.replay import ReplayUnknown, SeenSignatures
from ingress.results import ResultWaiter, Waiter
from sinks import pg
from sinks.redis_store import assets_key, balance_key
from streams.client import ShardOwners, account_url
from topics import limits
from topics.codec import encode
from topics.names import deployment_topics, engine_group, schema_name
from topics.producer import durable_producer
from topics.schema import PublicCommand, Result, kind_of
from topics.shard import shard_of

log = logging.getLogger(__name__)

WAIT_MAX_S = 30
CHECK_TIMEOUT_S = 2.0
_ACCOUNT = re.compile(limits.ACCOUNT_ID_PATTERN)
_COMMAND_ID = re.compile(limits.COMMAND_ID_PATTERN)
_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*([^,;\s]*)", re.IGNORECASE)
# Headers that change what a request does or who sent it: a request may give each once.
# (Prefer may repeat, as RFC 7240 allows, but not its `wait`: see prefer_wait.)
SINGLE_HEADERS = signing.SIGNED_HEADERS
_json = msgspec.json.Encoder()
# Metric labels are bounded: any other method a client invents counts as "other".
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_COMMAND_SQL = """
SELECT shard_id, command_id, account, kind, status, reason,
       (extract(epoch FROM at) * 1000)::bigint AS at_ms, reference, metadata::text AS metadata
FROM command_results
WHERE shard_id = ANY($1::int[]) AND command_id = $2
ORDER BY shard_id
LIMIT 2
"""


def _respond(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_json.encode(body), status=status, content_type="application/json", headers=headers
    )


def prefer_wait(header: str | list[str] | None) -> int:
    """The N of `Prefer: wait=N` (RFC 7240), 0 without one. Several Prefer headers are
    one list (RFC 9110 5.3); `wait` given twice has no one meaning and is refused."""
    if header is None:
        return 0
    joined = header if isinstance(header, str) else ",".join(header)
    matches = _WAIT.findall(joined)
    if not matches:
        return 0
    if len(matches) > 1:
        raise Problem(400, "invalid Prefer: wait", "wait is given more than once", field="Prefer")
    value = matches[0].strip('"')
    # ASCII digits only ("²".isdigit() is true), and no int() of a huge string.
    digits = value.lstrip("0") or "0"
    if not (value.isascii() and value.isdigit()) or len(digits) > 2 or int(digits) > WAIT_MAX_S:
        raise Problem(
            400,
            "invalid Prefer: wait",
            f"wait=N takes whole seconds from 0 to {WAIT_MAX_S}",
            field="Prefer",
        )
    return int(digits)


class Metrics:
    """Prometheus metrics of one ingress process. Labels are bounded sets (routes,
    methods, statuses, kinds): never an account or command id."""

    def __init__(self) -> None:
        # The *_created series double the output and nobody graphs them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tally_ingress_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tally_ingress_request_duration_seconds",
            "Time from request to answer, by route template, method and status.",
            ["route", "method", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.produce = Histogram(
            "tally_ingress_produce_duration_seconds",
            "Time from producing a request's commands to the broker's acknowledgement.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.disconnects = Counter(
            "tally_ingress_client_disconnects",
            "Requests whose client went away before its body arrived (not answered, so "
            "not in tally_ingress_requests_total), by route template and method.",
            ["route", "method"],
            registry=self.registry,
        )
        self.commands = Counter(
            "tally_ingress_commands",
            "Commands by kind and outcome (accepted, unavailable) after validation.",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._command_children: dict[tuple[str, str], Any] = {}

    def request(self, route: str, method: str, status: int) -> tuple[Any, Any]:
        """The request counter and latency histogram of one label set, looked up once
        (`labels()` costs more than the increment)."""
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            labels = (route, method, str(status))
            children = self._children[key] = (
                self.requests.labels(*labels),
                self.latency.labels(*labels),
            )
        return children

    def command(self, kind: str, outcome: str) -> Any:
        """The command counter of one (kind, outcome), looked up once, as `request`."""
        child = self._command_children.get((kind, outcome))
        if child is None:
            child = self._command_children[kind, outcome] = self.commands.labels(kind, outcome)
        return child


class Ingress:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = deployment_topics(settings)
        self.check(settings)
        self.keys = settings.client_keys()
        self.insecure = settings.ingress_insecure
        self.metrics = Metrics()
        self.buckets = TokenBuckets(settings.ingress_rate_per_s, settings.ingress_rate_burst)
        self.produce_timeout_s = settings.ingress_produce_timeout_ms / 1000
        self.body_timeout_s = settings.ingress_body_timeout_ms / 1000
        self.producer = durable_producer(
            settings.kafka_bootstrap,
            linger_ms=2,
            max_batch_size=512 * 1024,
            request_timeout_ms=settings.ingress_produce_timeout_ms,
        )
        self.waiter = ResultWaiter(
            settings.kafka_bootstrap, self.topics.events.name, settings.partitions
        )
        self.owners = ShardOwners(
            settings.kafka_bootstrap, engine_group(settings), self.topics.commands.name
        )
        self.redis: Any = None
        self.seen: SeenSignatures | None = None
        self.pg: Any = None
        self.http: aiohttp.ClientSession | None = None
        self.document = document()
        self.app = web.Application(
            middlewares=[self._middleware], client_max_size=settings.ingress_body_max_bytes
        )
        routes = self.app.router
        routes.add_post("/v1/commands", self.post_command)
        routes.add_post("/v1/commands/batch", self.post_batch)
        routes.add_get("/v1/commands/{command_id}", self.get_command, allow_head=False)
        routes.add_get("/v1/accounts/{account}/balances", self.get_balances, allow_head=False)
        subscriptions.add_routes(
            routes, self._admit, lambda: self.pg, allow_private=settings.notify_allow_private
        )
        self._read_routes(routes)
        routes.add_get("/livez", self.livez, allow_head=False)
        routes.add_get("/readyz", self.readyz, allow_head=False)
        routes.add_get("/metrics", self.get_metrics, allow_head=False)
        routes.add_get("/openapi.json", self.get_openapi, allow_head=False)
        self.app.on_startup.append(self._open)
        self.app.on_cleanup.append(self._close)

    @staticmethod
    def check(settings: Settings) -> None:
        """Refuse to start without a way to authenticate clients."""
        if not settings.client_keys() and not settings.ingress_insecure:
            raise SettingsError(
                "TALLY_INGRESS_KEYS is empty: configure client keys, or set "
                "TALLY_INGRESS_INSECURE=1 to accept unsigned requests (never in production)"
            )

    # --- lifecycle -------------------------------------------------------------

    async def _open(self, _: web.Application) -> None:
        if self.insecure:
            log.warning(
                "TALLY_INGRESS_INSECURE is set: requests are NOT signature-checked, anyone "
                "who reaches this port can move money. Never run this way in production."
            )
        await self.producer.start()
        await self.waiter.start()
        self.redis = aioredis.from_url(
            self.settings.redis_url, socket_timeout=5, socket_connect_timeout=2
        )
        self.seen = SeenSignatures(self.redis, self.settings.topic_prefix)
        self.pg = await pg.create_pool(
            self.settings.pg_dsn,
            schema_name(self.settings),
            min_size=0,
            max_size=4,
            exact_money=True,  # money as exact ints (ingress.reads)
        )
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        log.info(
            "ingress: producing to %s; %d client keys (%s)",
            self.topics.commands.name,
            len(self.keys),
            ", ".join(sorted(self.keys)),
        )

    async def _close(self, _: web.Application) -> None:
        for closing in (
            self.http.close() if self.http else None,
            self.pg.close() if self.pg else None,
            self.seen.close() if self.seen else None,
            self.redis.aclose() if self.redis else None,
            self.waiter.stop(),
            self.producer.stop(),
        ):
            if closing is not None:
                with contextlib.suppress(Exception):
                    await closing

    # --- the middleware: errors as problems, and metrics ----------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        response: web.StreamResponse
        try:
            response = await handler(request)
        except Problem as problem:
            response = problem.response()
        except ClientGone as gone:
            # Not an error of ours, and no answer can reach the client: counted apart,
            # logged quietly, once.
            method = request.method if request.method in _METHODS else "other"
            self.metrics.disconnects.labels(route, method).inc()
            log.debug("ingress: client left during %s %s (%s)", request.method, route, gone)
            return web.Response(status=400)
        except web.HTTPException as exc:
            headers = {k: v for k, v in exc.headers.items() if k in ("Allow",)}
            field = "body" if exc.status == 413 else None
            answer = Problem(exc.status, exc.reason, exc.text, field=field, headers=headers)
            response = answer.response()
        except Exception:
            log.exception("ingress: %s %s failed", request.method, route)
            response = Problem(500, "internal error", "see the ingress log").response()
        method = request.method if request.method in _METHODS else "other"
        counter, histogram = self.metrics.request(route, method, response.status)
        counter.inc()
        histogram.observe(time.perf_counter() - started)
        return response

    def refused_by_parser(self, status: int) -> None:
        """Count a request aiohttp's parser refused (see ingress.protocol)."""
        counter, _ = self.metrics.request("unparsed", "other", status)
        counter.inc()

    # --- the checks every /v1 request goes through -----------------------------

    async def _admit(self, request: web.Request) -> tuple[str, bytes]:
        """Read the body (bounded in size and time), check the signature, take one token
        of the rate limit (a batch pays for its other commands once parsed) and check
        that the signature is used for the first time; return the client (key id, or
        address when unsigned) and the body."""
        limit = self.settings.ingress_body_max_bytes
        if request.content_length is not None and request.content_length > limit:
            raise Problem(
                413,
                "body too large",
                f"{request.content_length} bytes; the limit is {limit}",
                field="body",
            )
        _single_headers(request)
        body = await self._read(request)
        if self.insecure:
            client = f"address:{request.remote}"
            self._limit(client, 1)
        else:
            client = await self._authenticate(request, body)
        return client, body

    async def _read(self, request: web.Request) -> bytes:
        limit = self.settings.ingress_body_max_bytes
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Problem(
                413, "body too large", f"the limit is {limit} bytes", field="body"
            ) from None
        except TimeoutError:
            timeout_ms = self.settings.ingress_body_timeout_ms
            raise Problem(
                408,
                "body too slow",
                f"the body did not arrive within {timeout_ms} ms",
                field="body",
                close=True,
            ) from None
        except ConnectionError as exc:  # aiohttp's ClientConnectionResetError is one
            raise ClientGone(type(exc).__name__) from None
        except HttpProcessingError as exc:  # a chunked body that breaks its framing
            raise Problem(
                400,
                "malformed body framing",
                exc.message[:200],
                field="body",
                close=True,
            ) from None

    async def _authenticate(self, request: web.Request, body: bytes) -> str:
        unauthorized = {"WWW-Authenticate": 'Tally-HMAC-SHA256 realm="tally"'}
        try:
            signed = signing.verify(
                self.keys,
                request.headers,
                request.method,
                request.raw_path,
                body,
                max_skew_s=self.settings.ingress_max_skew_s,
            )
        except signing.SignatureError as exc:
            raise Problem(
                401, "request not signed correctly", exc.detail, field=exc.field,
                headers=unauthorized,
            ) from None  # fmt: skip
        # The rate limit before the claim: what a client can make Redis hold is bounded
        # by its rate times the skew window.
        self._limit(signed.key_id, 1)
        assert self.seen is not None
        ttl_s = signed.valid_until_s - int(time.time()) + 1
        try:
            first = await self.seen.claim(signed.key_id, signed.signature, ttl_s)
        except ReplayUnknown as exc:
            raise Problem(
                503,
                "Redis unavailable",
                f"cannot check that the signature is new ({exc}); retry with a new signature",
                field="redis",
                headers={"Retry-After": "2"},
            ) from None
        if not first:
            raise Problem(
                401,
                "signature already used",
                "a signature is accepted once: sign the request again (a new nonce)",
                field=signing.SIGNATURE,
                headers=unauthorized,
            )
        return signed.key_id

    def _limit(self, client: str, cost: int) -> None:
        wait_s = self.buckets.take(client, cost)
        if wait_s > 0:
            raise Problem(
                429,
                "rate limit exceeded",
                f"this client may send {self.settings.ingress_rate_per_s} commands/s "
                f"(bursts of {self.settings.ingress_rate_burst})",
                headers={"Retry-After": TokenBuckets.retry_after(wait_s)},
            )

    @staticmethod
    def _json_body(request: web.Request) -> None:
        if request.content_type != "application/json":
            raise Problem(
                415,
                "unsupported content type",
                f"got {request.content_type or 'none'}; send application/json",
                field="Content-Type",
            )

    @staticmethod
    def _no_query(request: web.Request, allowed: tuple[str, ...] = ()) -> None:
        for name in request.query:
            if name not in allowed:
                raise Problem(400, "unknown query parameter", f"{name!r} is not taken here",
                              field=name)  # fmt: skip

    # --- producing ----------------------------------------------------------------

    async def _produce(self, commands: list[PublicCommand]) -> list[RecordMetadata | None]:
        """Produce in order; the metadata of each record the broker acknowledged within
        the produce timeout, None for the others."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.produce_timeout_s
        started = time.perf_counter()
        topic = self.topics.commands.name
        partitions = self.settings.partitions
        futures: list[asyncio.Future[RecordMetadata]] = []
        with contextlib.suppress(TimeoutError, KafkaError):
            async with asyncio.timeout_at(deadline):
                for command in commands:
                    # shard_of is the default partitioner's murmur2, cached per account;
                    # aiokafka's own is pure Python and runs for every record.
                    future = await self.producer.send(
                        topic,
                        value=encode(command),
                        key=command.account.encode(),
                        partition=shard_of(command.account, partitions),
                    )
                    # A late failure after we answered must not log "never retrieved".
                    future.add_done_callback(_retrieve)
                    futures.append(future)
        if futures:
            await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
        self.metrics.produce.observe(time.perf_counter() - started)
        out: list[RecordMetadata | None] = []
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for i, command in enumerate(commands):
            future = futures[i] if i < len(futures) else None
            ok = future is not None and future.done() and future.exception() is None
            out.append(future.result() if ok and future is not None else None)
            counts[kind_of(command), "accepted" if ok else "unavailable"] += 1
        for (kind, outcome), n in counts.items():
            self.metrics.command(kind, outcome).inc(n)
        return out

    def _unavailable(self, detail: str) -> Problem:
        return Problem(
            503,
            "Kafka unavailable",
            detail,
            field="kafka",
            headers={"Retry-After": "2"},
        )

    # --- handlers -----------------------------------------------------------------

    async def post_command(self, request: web.Request) -> web.Response:
        _, body = await self._admit(request)
        self._no_query(request)
        self._json_body(request)
        wait_s = prefer_wait(request.headers.getall("Prefer", None))
        command = parse_command(body, request.headers.get(IDEMPOTENCY_KEY))
        waiter = self.waiter.expect(command.account, command.command_id) if wait_s else None
        try:
            (meta,) = await self._produce([command])
            if meta is None:
                raise self._unavailable(
                    "the broker did not acknowledge the command in time; it may or may not "
                    "have been recorded: retry with the same command_id"
                )
            accepted = {
                "command_id": command.command_id,
                "account": command.account,
                "kind": kind_of(command),
                "status": "accepted",
                "partition": meta.partition,
                "offset": meta.offset,
            }
            if waiter is None:
                return _respond(accepted, 202)
            waiter.produced(meta.partition, meta.offset)
            try:
                result: Result = await asyncio.wait_for(asyncio.shield(waiter.future), wait_s)
            except TimeoutError:
                return _respond(accepted, 202, headers={"Preference-Applied": f"wait={wait_s}"})
            return web.Response(
                body=encode(result),
                status=200,
                content_type="application/json",
                headers={"Preference-Applied": f"wait={wait_s}"},
            )
        finally:
            if waiter is not None:
                self.waiter.forget(waiter)

    async def post_batch(self, request: web.Request) -> web.Response:
        client, body = await self._admit(request)
        self._no_query(request)
        self._json_body(request)
        if IDEMPOTENCY_KEY in request.headers:
            raise Problem(
                400,
                "Idempotency-Key on a batch",
                "each command of a batch carries its own command_id",
                field=IDEMPOTENCY_KEY,
            )
        wait_s = prefer_wait(request.headers.getall("Prefer", None))
        items = parse_batch(body)
        commands = [item for item in items if not isinstance(item, Problem)]
        # The request paid for one command at admission; the rest of the batch now.
        if len(commands) > 1:
            self._limit(client, len(commands) - 1)
        waiters = [self.waiter.expect(c.account, c.command_id) for c in commands] if wait_s else []
        try:
            produced = await self._produce(commands) if commands else []
            return await self._batch_answer(items, produced, waiters, wait_s)
        finally:
            for waiter in waiters:
                self.waiter.forget(waiter)

    async def _batch_answer(
        self,
        items: list[PublicCommand | Problem],
        produced: list[RecordMetadata | None],
        waiters: list[Waiter],
        wait_s: int,
    ) -> web.Response:
        """The per-item answer of a batch; with `Prefer: wait`, each accepted item
        whose result came within the wait carries it (status 200), and the whole batch
        is 200 when every item did, else 207."""
        results = await self._batch_results(produced, waiters, wait_s)
        metas = iter(produced)
        outcomes = iter(results)
        answers: list[dict[str, Any]] = []
        accepted = unavailable = answered = 0
        for index, item in enumerate(items):
            if isinstance(item, Problem):
                answers.append({"index": index, "status": item.status, "problem": item.body()})
                continue
            meta = next(metas)
            if meta is None:
                unavailable += 1
                problem = self._unavailable("not acknowledged in time; retry this command")
                answers.append(
                    {
                        "index": index,
                        "status": 503,
                        "command_id": item.command_id,
                        "problem": problem.body(),
                    }
                )
                continue
            accepted += 1
            answer = {
                "index": index,
                "status": 202,
                "command_id": item.command_id,
                "account": item.account,
                "partition": meta.partition,
                "offset": meta.offset,
            }
            result = next(outcomes)
            if result is not None:
                answer["status"] = 200
                answer["result"] = result
                answered += 1
            answers.append(answer)
        summary = {
            "accepted": accepted,
            "invalid": sum(isinstance(item, Problem) for item in items),
            "unavailable": unavailable,
            "items": answers,
        }
        if unavailable and not accepted:
            return _respond(summary, 503, headers={"Retry-After": "2"})
        if not wait_s:
            return _respond(summary, 202 if accepted == len(items) else 207)
        summary["answered"] = answered
        applied = {"Preference-Applied": f"wait={wait_s}"}
        return _respond(summary, 200 if answered == len(items) else 207, headers=applied)

    async def _batch_results(
        self, produced: list[RecordMetadata | None], waiters: list[Waiter], wait_s: int
    ) -> list[Result | None]:
        """Each acknowledged command's result if it came within `wait_s` (one deadline
        for the whole batch), in the order of the acknowledged commands."""
        if not wait_s:
            return [None] * sum(m is not None for m in produced)
        acked = [(w, m) for w, m in zip(waiters, produced, strict=True) if m is not None]
        for waiter, meta in acked:
            waiter.produced(meta.partition, meta.offset)
        if not acked:
            return []
        futures = [asyncio.shield(w.future) for w, _ in acked]
        await asyncio.wait(futures, timeout=wait_s)
        return [w.future.result() if w.future.done() else None for w, _ in acked]

    async def get_command(self, request: web.Request) -> web.Response:
        await self._admit(request)
        self._no_query(request, ("account",))
        command_id = request.match_info["command_id"]
        if not _COMMAND_ID.match(command_id):
            raise Problem(
                400, "invalid command id", "1-128 characters of A-Z a-z 0-9 _ . : -",
                field="command_id",
            )  # fmt: skip
        account = request.query.get("account")
        if account is not None:
            _check_account(account)
            shards = [shard_of(account, self.settings.partitions)]
        else:
            shards = list(range(self.settings.partitions))
        rows = await _postgres(self.pg.fetch(_COMMAND_SQL, shards, command_id))
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
        return _respond(reads.command_row(rows[0]))

    async def get_balances(self, request: web.Request) -> web.Response:
        if "at" in request.query or "seq" in request.query:
            return await self.get_balances_at(request)
        await self._admit(request)
        self._no_query(request, ("consistency",))
        account = request.match_info["account"]
        _check_account(account)
        consistency = request.query.get("consistency", "cached")
        if consistency not in ("cached", "strong"):
            raise Problem(
                400, "invalid consistency", "cached (default) or strong", field="consistency"
            )
        shard = shard_of(account, self.settings.partitions)
        if consistency == "strong":
            balances = await self._strong(account, shard)
        else:
            balances = await self._cached(account, shard)
        return _respond(
            {
                "account": account,
                "shard_id": shard,
                "consistency": consistency,
                "balances": balances,
            }
        )

    async def _cached(self, account: str, shard: int) -> dict[str, dict[str, int]]:
        prefix = self.settings.topic_prefix
        try:
            raw_assets = await self.redis.smembers(assets_key(prefix, shard, account))
            assets = sorted(a.decode() for a in raw_assets)
            async with self.redis.pipeline(transaction=False) as pipe:
                for asset in assets:
                    key = balance_key(prefix, shard, account, asset)
                    pipe.hmget(key, "available", "held", "seq")
                rows = await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            raise Problem(
                503, "Redis unavailable", type(exc).__name__, field="redis",
                headers={"Retry-After": "2"},
            ) from None  # fmt: skip
        return {
            asset: {"available": int(row[0]), "held": int(row[1]), "seq": int(row[2])}
            for asset, row in zip(assets, rows, strict=True)
            if None not in row
        }

    async def _strong(self, account: str, shard: int) -> dict[str, dict[str, int]]:
        balances = (await self._engine_view(account, shard))["balances"]
        # The worker's view also gives each overdraft limit (for GET /v1/accounts/{id}).
        return {
            asset: {k: b[k] for k in ("available", "held", "seq")} for asset, b in balances.items()
        }

    async def _engine_view(self, account: str, shard: int) -> dict[str, Any]:
        """The owning worker's table view of the account (`streams.client.account_url`)."""
        assert self.http is not None
        try:
            owner = await asyncio.wait_for(self.owners.of(shard), CHECK_TIMEOUT_S * 2)
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
            async with self.http.get(account_url(owner, account)) as response:
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

    # --- the ledger's reads (issue 16; queries in ingress.reads) ---------------------

    def _read_routes(self, routes: web.UrlDispatcher) -> None:
        routes.add_get("/v1/commands", self.get_commands, allow_head=False)
        routes.add_get("/v1/accounts/{account}", self.get_account, allow_head=False)
        routes.add_get("/v1/accounts/{account}/entries", self.get_entries, allow_head=False)

    @staticmethod
    def _read_query(request: web.Request, allowed: tuple[str, ...]) -> None:
        """Only `allowed` query parameters, each given once (a repeated one has no one
        meaning: refused, naming it)."""
        Ingress._no_query(request, allowed)
        for name in request.query:
            if len(request.query.getall(name)) > 1:
                raise Problem(400, "repeated query parameter", f"give {name} once", field=name)

    async def get_commands(self, request: web.Request) -> web.Response:
        """`GET /v1/commands?reference=...`: the commands carrying a reference."""
        await self._admit(request)
        self._read_query(request, ("reference",))
        reference = reads.parse_reference(request.query.get("reference"))
        return _respond(await _postgres(reads.commands_by_reference(self.pg, reference)))

    async def get_entries(self, request: web.Request) -> web.Response:
        """One page of a balance's history, oldest first, with a `next` link."""
        await self._admit(request)
        query = request.query
        self._read_query(request, ("asset", "after_seq", "before_seq", "limit"))
        account = request.match_info["account"]
        _check_account(account)
        asset = reads.parse_asset(query.get("asset"), required=True)
        assert asset is not None
        after_seq = reads.parse_seq(query.get("after_seq"), "after_seq") or 0
        before_seq = reads.parse_seq(query.get("before_seq"), "before_seq", least=1)
        limit = reads.parse_limit(query.get("limit"))
        page = reads.history(
            self.pg,
            shard=shard_of(account, self.settings.partitions),
            account=account,
            asset=asset,
            after_seq=after_seq,
            before_seq=before_seq,
            limit=limit,
        )
        return _respond(await _postgres(page))

    async def get_balances_at(self, request: web.Request) -> web.Response:
        """`?at=<time>` (every asset, or `asset`) or `?seq=N&asset=X`: a past balance."""
        await self._admit(request)
        query = request.query
        self._read_query(request, ("at", "seq", "asset"))
        account = request.match_info["account"]
        _check_account(account)
        shard = shard_of(account, self.settings.partitions)
        body: dict[str, Any] = {"account": account, "shard_id": shard}
        if "at" in query and "seq" in query:
            raise Problem(400, "at and seq", "give one of at and seq", field="seq")
        if "seq" in query:
            asset = reads.parse_asset(query.get("asset"), required=True)
            assert asset is not None
            seq = reads.parse_seq(query.get("seq"), "seq")
            assert seq is not None
            balance = reads.balance_at_seq(
                self.pg, shard=shard, account=account, asset=asset, seq=seq
            )
            body["seq"] = seq
            body["balances"] = {asset: await _postgres(balance)}
        else:
            asset = reads.parse_asset(query.get("asset"), required=False)
            at_ms = reads.parse_time(query["at"])
            balances = reads.balances_at_time(
                self.pg, shard=shard, account=account, asset=asset, at_ms=at_ms
            )
            body["at_ms"] = at_ms
            body["balances"] = await _postgres(balances)
        body["consistency"] = "projection"
        return _respond(body)

    async def get_account(self, request: web.Request) -> web.Response:
        """Status, overdraft limits, assets and last seqs, from the owning worker."""
        await self._admit(request)
        self._no_query(request)
        account = request.match_info["account"]
        _check_account(account)
        shard = shard_of(account, self.settings.partitions)
        view = await self._engine_view(account, shard)
        balances = view["balances"]
        return _respond(
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

    async def livez(self, request: web.Request) -> web.Response:
        return _respond({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        checks = dict(
            zip(
                ("kafka", "postgres", "redis"),
                await asyncio.gather(
                    _check(self.producer.client.fetch_all_metadata()),
                    _check(self.pg.fetchval("SELECT 1")),
                    _check(self.redis.ping()),
                ),
                strict=True,
            )
        )
        failing = [name for name, state in checks.items() if state != "ok"]
        if failing:
            raise Problem(
                503,
                "not ready",
                "; ".join(f"{name}: {checks[name]}" for name in failing),
                field=failing[0],
                failing=failing,
                checks=checks,
                headers={"Retry-After": "2"},
            )
        return _respond({"ready": True, "checks": checks})

    async def get_metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def get_openapi(self, request: web.Request) -> web.Response:
        return _respond(self.document)


class ClientGone(Exception):
    """The client closed the connection before its request was read."""


def _single_headers(request: web.Request) -> None:
    """Refuse a request that gives a header of SINGLE_HEADERS twice. (aiohttp's parser
    already refuses a second Content-Type, Content-Length, Host and a few more.)"""
    headers = request.headers
    for name in SINGLE_HEADERS:
        if len(headers.getall(name, ())) > 1:
            raise Problem(
                400, "repeated header", f"{name} is given more than once; give it once",
                field=name,
            )  # fmt: skip


def _check_account(account: str) -> None:
    if not _ACCOUNT.match(account):
        raise Problem(
            400, "invalid account id", "1-64 characters of A-Z a-z 0-9 _ . : -", field="account"
        )


async def _check(probe: Awaitable[Any]) -> str:
    try:
        await asyncio.wait_for(probe, CHECK_TIMEOUT_S)
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok"


_T = TypeVar("_T")


async def _postgres(query: Awaitable[_T]) -> _T:
    """A read query's answer, or a 503 when PostgreSQL cannot give it in time."""
    try:
        return await asyncio.wait_for(query, CHECK_TIMEOUT_S * 2)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
            asyncpg.InternalClientError) as exc:  # fmt: skip
        raise Problem(
            503, "PostgreSQL unavailable", type(exc).__name__, field="postgres",
            headers={"Retry-After": "2"},
        ) from None  # fmt: skip


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
