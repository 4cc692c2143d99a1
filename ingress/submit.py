"""`POST /v1/commands` and `POST /v1/commands/batch`: admitted requests -> commands on
Kafka, answered once the broker acknowledged them (202) or, with `Prefer: wait=N`, with
their results (200). After admission: content type (415) -> body and headers (400/422)
-> produce (202 after the broker's ack, or 503).

An accepted command is in Kafka with acks=all from an idempotent producer; a 503 means
the broker did not confirm in time, and a retry with the same command_id is safe either
way (the engine answers a repeat as a duplicate of the first).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

from aiohttp import web
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from core.http import json_response
from core.settings import Settings
from ingress.admission import Admission
from ingress.checks import json_body, no_query
from ingress.commands import IDEMPOTENCY_KEY, parse_batch, parse_command
from ingress.connections import Connections
from ingress.metrics import Metrics
from ingress.problems import Problem
from ingress.results import Waiter
from ingress.waiting import prefer_wait, result_of, results_of
from topics.codec import encode
from topics.names import deployment_topics
from topics.schema import PublicCommand, kind_of
from topics.shard import shard_of


class Submit:
    """The command handlers of one ingress process."""

    def __init__(
        self, settings: Settings, connections: Connections, admission: Admission, metrics: Metrics
    ) -> None:
        self.partitions = settings.partitions
        self.topic = deployment_topics(settings).commands.name
        self.produce_timeout_s = settings.ingress_produce_timeout_ms / 1000
        self.connections = connections
        self.admission = admission
        self.metrics = metrics

    async def post_command(self, request: web.Request) -> web.Response:
        _, body = await self.admission.admit(request)
        no_query(request)
        json_body(request)
        wait_s = prefer_wait(request.headers.getall("Prefer", None))
        command = parse_command(body, request.headers.get(IDEMPOTENCY_KEY))
        results = self.connections.waiter
        waiter = results.expect(command.account, command.command_id) if wait_s else None
        try:
            (meta,) = await self.produce([command])
            if meta is None:
                raise unavailable(
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
                return json_response(accepted, 202)
            applied = {"Preference-Applied": f"wait={wait_s}"}
            result = await result_of(waiter, meta, wait_s)
            if result is None:
                return json_response(accepted, 202, headers=applied)
            return web.Response(
                body=encode(result), status=200, content_type="application/json", headers=applied
            )
        finally:
            if waiter is not None:
                results.forget(waiter)

    async def post_batch(self, request: web.Request) -> web.Response:
        client, body = await self.admission.admit(request)
        no_query(request)
        json_body(request)
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
            self.admission.limit(client, len(commands) - 1)
        results = self.connections.waiter
        waiters = [results.expect(c.account, c.command_id) for c in commands] if wait_s else []
        try:
            produced = await self.produce(commands) if commands else []
            return await _batch_answer(items, produced, waiters, wait_s)
        finally:
            for waiter in waiters:
                results.forget(waiter)

    async def produce(self, commands: list[PublicCommand]) -> list[RecordMetadata | None]:
        """Produce in order; the metadata of each record the broker acknowledged within
        the produce timeout, None for the others."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.produce_timeout_s
        started = time.perf_counter()
        producer = self.connections.producer
        futures: list[asyncio.Future[RecordMetadata]] = []
        with contextlib.suppress(TimeoutError, KafkaError):
            async with asyncio.timeout_at(deadline):
                for command in commands:
                    # shard_of is the default partitioner's murmur2, cached per account;
                    # aiokafka's own is pure Python and runs for every record.
                    future = await producer.send(
                        self.topic,
                        value=encode(command),
                        key=command.account.encode(),
                        partition=shard_of(command.account, self.partitions),
                    )
                    # A late failure after we answered must not log "never retrieved".
                    future.add_done_callback(_retrieve)
                    futures.append(future)
        if futures:
            await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
        self.metrics.produce.observe(time.perf_counter() - started)
        return self._acknowledged(commands, futures)

    def _acknowledged(
        self, commands: list[PublicCommand], futures: list[asyncio.Future[RecordMetadata]]
    ) -> list[RecordMetadata | None]:
        """Each command's record metadata if acknowledged, counted by kind and outcome."""
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


def unavailable(detail: str) -> Problem:
    return Problem(503, "Kafka unavailable", detail, field="kafka", headers={"Retry-After": "2"})


async def _batch_answer(
    items: list[PublicCommand | Problem],
    produced: list[RecordMetadata | None],
    waiters: list[Waiter],
    wait_s: int,
) -> web.Response:
    """The per-item answer of a batch; with `Prefer: wait`, each accepted item
    whose result came within the wait carries it (status 200), and the whole batch
    is 200 when every item did, else 207."""
    results = iter(await results_of(produced, waiters, wait_s))
    metas = iter(produced)
    answers: list[dict[str, Any]] = []
    accepted = unavailable_n = answered = 0
    for index, item in enumerate(items):
        if isinstance(item, Problem):
            answers.append({"index": index, "status": item.status, "problem": item.body()})
            continue
        meta = next(metas)
        if meta is None:
            unavailable_n += 1
            problem = unavailable("not acknowledged in time; retry this command")
            answers.append(
                {"index": index, "status": 503, "command_id": item.command_id,
                 "problem": problem.body()}
            )  # fmt: skip
            continue
        accepted += 1
        answer = {
            "index": index, "status": 202, "command_id": item.command_id,
            "account": item.account, "partition": meta.partition, "offset": meta.offset,
        }  # fmt: skip
        result = next(results)
        if result is not None:
            answer["status"] = 200
            answer["result"] = result
            answered += 1
        answers.append(answer)
    summary: dict[str, Any] = {
        "accepted": accepted,
        "invalid": sum(isinstance(item, Problem) for item in items),
        "unavailable": unavailable_n,
        "items": answers,
    }
    if unavailable_n and not accepted:
        return json_response(summary, 503, headers={"Retry-After": "2"})
    if not wait_s:
        return json_response(summary, 202 if accepted == len(items) else 207)
    summary["answered"] = answered
    applied = {"Preference-Applied": f"wait={wait_s}"}
    return json_response(summary, 200 if answered == len(items) else 207, headers=applied)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
