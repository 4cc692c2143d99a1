"""The ingress attacked over raw sockets (issue #13: findings 2, 3 and 5, and more).

Real `tally ingress` processes in front of a real engine worker; every request is
written byte for byte on a TCP connection (not through an HTTP client, which would
normalise what an attacker would not: repeated headers, broken framing, half bodies).
Each attack has the status it must get, as application/problem+json; afterwards the
commands topic is read back from the start, and it must hold exactly the commands that
were accepted, and /metrics of every process must show no status="500".
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.settings import Settings
from harness.procs import EngineProcess, IngressProcess, free_port
from ingress import signing
from tests.integration.stack_support import scratch, started

PARTITIONS = 2
KEY_ID, SECRET = "attack-client", "attack-secret-0123456789"
BODY_TIMEOUT_MS = 1000
PROBLEM = "application/problem+json"
pytestmark = pytest.mark.timeout(300)


@dataclass
class Reply:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    closed: bool  # the server closed the connection after it

    @property
    def json(self) -> Any:
        return msgspec.json.decode(self.body) if self.body else None

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


@dataclass
class Stack:
    settings: Settings
    engine: EngineProcess
    ingress: IngressProcess
    second: IngressProcess  # the same deployment, another process: replays go there too
    unique: str
    accepted: set[str] = field(default_factory=set)  # command ids answered 202
    refused: set[str] = field(default_factory=set)  # command ids that must not be produced
    shared_id: str | None = None  # a command_id two batch items on one account shared

    def id(self, name: str) -> str:
        return f"{name}-{self.unique}"


@pytest.fixture(scope="module")
async def stack(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    d = scratch(settings, tmp_path_factory, "atk", PARTITIONS)
    engine = d.engine()
    ingress, second = (
        d.ingress(
            f"ingress-{n}", keys={KEY_ID: SECRET}, ingress_body_timeout_ms=BODY_TIMEOUT_MS,
            ingress_body_max_bytes=65536,
        )
        for n in (1, 2)
    )  # fmt: skip
    async with started([engine], [ingress, second]):
        yield Stack(d.settings, engine, ingress, second, d.unique)


# --- writing requests byte for byte -------------------------------------------------


def deposit(command_id: str | None, account: str = "atk", amount: int = 5) -> bytes:
    cid = "" if command_id is None else f'"command_id":"{command_id}",'
    return (
        f'{{"kind":"deposit",{cid}"account":"{account}","asset":"USD","amount":{amount}}}'
    ).encode()


def signed_headers(
    method: str,
    target: str,
    body: bytes,
    *,
    idempotency_key: str | None = None,
    content_type: str | None = "application/json",
) -> list[tuple[str, str]]:
    headers = []
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    if idempotency_key is not None:
        headers.append(("Idempotency-Key", idempotency_key))
    sig = signing.sign(
        KEY_ID,
        SECRET.encode(),
        method,
        target,
        body,
        idempotency_key=idempotency_key,
        content_type=content_type,
    )
    return headers + list(sig.items())


def request_bytes(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    *,
    length: int | None = None,
) -> bytes:
    """An HTTP/1.1 request, headers in the order given; Content-Length is `length` (the
    body's length by default; -1: none)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    n = len(body) if length is None else length
    if n >= 0:
        lines.append(f"Content-Length: {n}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


async def read_reply(reader: asyncio.StreamReader, timeout_s: float = 15) -> Reply | None:
    """One response, or None if the server closed without one."""
    async with asyncio.timeout(timeout_s):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, list[str]] = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(headers.get("content-length", ["0"])[0])
        body = await reader.readexactly(length)
        closed = headers.get("connection", [""])[0].lower() == "close"
        return Reply(int(status_line.split()[1]), headers, body, closed)


async def send(port: int, data: bytes, *, replies: int = 1, eof: bool = False) -> list[Reply]:
    """Write `data` on a new connection and read up to `replies` answers; with `eof`,
    also whether the server then closed the connection (into the last reply's
    `closed`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = []
        for _ in range(replies):
            reply = await read_reply(reader)
            if reply is None:
                break
            out.append(reply)
        if eof and out:
            try:
                rest = await asyncio.wait_for(reader.read(), 3)
            except TimeoutError:
                rest = b"(still open)"
            out[-1].closed = out[-1].closed or rest == b""
        return out
    finally:
        writer.close()
        await writer.wait_closed()


async def one(port: int, data: bytes) -> Reply:
    (reply,) = await send(port, data)
    return reply


def expect(reply: Reply, status: int, field: str | None = None) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.header("Content-Type") == PROBLEM, reply.headers
    problem: dict[str, Any] = reply.json
    assert problem["status"] == status
    if field is not None:
        assert problem.get("field") == field, problem
    return problem


def accepted(stack: Stack, reply: Reply, command_id: str) -> None:
    assert reply.status == 202, (reply.status, reply.body[:300])
    assert reply.json["command_id"] == command_id
    stack.accepted.add(command_id)


# --- finding 2: a signature covers the request's meaning and is accepted once ---------


async def test_a_signature_is_accepted_once_across_processes(stack: Stack) -> None:
    cid = stack.id("replay")
    body = deposit(cid)
    request = request_bytes(
        "POST", "/v1/commands", signed_headers("POST", "/v1/commands", body), body
    )
    accepted(stack, await one(stack.ingress.port, request), cid)
    for port in (stack.ingress.port, stack.second.port):
        problem = expect(await one(port, request), 401, "Tally-Signature")
        assert problem["title"] == "signature already used"
    # Sent twice on one connection (pipelined): the second is refused too.
    cid2 = stack.id("replay-pipelined")
    body2 = deposit(cid2)
    request2 = request_bytes(
        "POST", "/v1/commands", signed_headers("POST", "/v1/commands", body2), body2
    )
    first, second = await send(stack.second.port, request2 * 2, replies=2)
    accepted(stack, first, cid2)
    expect(second, 401, "Tally-Signature")


async def test_a_signature_sent_many_times_at_once_is_accepted_once(stack: Stack) -> None:
    """Twenty copies at the same moment, over both processes (so in one Redis pipeline and
    in two): exactly one is a command."""
    cid = stack.id("replay-burst")
    body = deposit(cid)
    request = request_bytes(
        "POST", "/v1/commands", signed_headers("POST", "/v1/commands", body), body
    )
    ports = [stack.ingress.port, stack.second.port] * 10
    replies = await asyncio.gather(*(one(port, request) for port in ports))
    statuses = sorted(r.status for r in replies)
    assert statuses == [202] + [401] * 19, statuses
    stack.accepted.add(cid)


async def test_a_signature_does_not_carry_over_to_another_idempotency_key(stack: Stack) -> None:
    """Finding 2: a transfer body without command_id, signed once, sent with three
    Idempotency-Keys, was three transfers."""
    body = deposit(None)
    keys = [stack.id(f"idem-{n}") for n in range(3)]
    headers = signed_headers("POST", "/v1/commands", body, idempotency_key=keys[0])
    accepted(
        stack,
        await one(stack.ingress.port, request_bytes("POST", "/v1/commands", headers, body)),
        keys[0],
    )
    for key in keys[1:]:
        changed = [(n, key if n == "Idempotency-Key" else v) for n, v in headers]
        expect(
            await one(stack.second.port, request_bytes("POST", "/v1/commands", changed, body)),
            401,
            "Tally-Signature",
        )
        stack.refused.add(key)
    # Added where the signer sent none:
    bare = signed_headers("POST", "/v1/commands", body)
    added = [*bare, ("Idempotency-Key", stack.id("idem-added"))]
    expect(
        await one(stack.ingress.port, request_bytes("POST", "/v1/commands", added, body)),
        401,
        "Tally-Signature",
    )
    stack.refused.add(stack.id("idem-added"))


async def test_a_signature_does_not_carry_over_to_another_content_type(stack: Stack) -> None:
    cid = stack.id("ctype")
    body = deposit(cid)
    headers = signed_headers("POST", "/v1/commands", body, content_type="application/json")
    changed = [
        (n, "application/json; charset=utf-8" if n == "Content-Type" else v) for n, v in headers
    ]
    expect(
        await one(stack.ingress.port, request_bytes("POST", "/v1/commands", changed, body)),
        401,
        "Tally-Signature",
    )
    dropped = [(n, v) for n, v in headers if n != "Content-Type"]
    expect(
        await one(stack.ingress.port, request_bytes("POST", "/v1/commands", dropped, body)),
        401,
        "Tally-Signature",
    )
    stack.refused.add(cid)


async def test_without_redis_the_ingress_fails_closed(settings: Settings, tmp_path: Path) -> None:
    """Nobody can tell a replay from a first use without Redis: 503, never 202."""
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    proc = IngressProcess(
        settings,
        prefix=f"atk-noredis-{time.time_ns()}",
        log_path=tmp_path / "noredis.log",
        partitions=PARTITIONS,
        keys={KEY_ID: SECRET},
        redis_url=dead_redis,
    )
    await proc.start(wait=False)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                await send(proc.port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
                break
            except OSError:
                assert time.monotonic() < deadline, proc.tail()
                await asyncio.sleep(0.2)
        body = deposit("no-redis-1")
        reply = await one(
            proc.port,
            request_bytes(
                "POST", "/v1/commands", signed_headers("POST", "/v1/commands", body), body
            ),
        )
        problem = expect(reply, 503, "redis")
        assert reply.header("Retry-After") == "2", problem
    finally:
        await proc.stop()


# --- finding 3: one meaning for every request ---------------------------------------


def _dup_body(cid: str) -> list[tuple[str, bytes, str]]:
    return [
        (
            "top",
            f'{{"kind":"withdraw","kind":"deposit","command_id":"{cid}-a","account":"atk",'
            f'"asset":"USD","amount":5}}'.encode(),
            "kind",
        ),
        (
            "escaped",
            f'{{"kind":"withdraw","\\u006bind":"deposit","command_id":"{cid}-b",'
            f'"account":"atk","asset":"USD","amount":5}}'.encode(),
            "kind",
        ),
        (
            "amount",
            f'{{"kind":"deposit","command_id":"{cid}-c","account":"atk","asset":"USD",'
            f'"amount":5,"amount":500000}}'.encode(),
            "amount",
        ),
        (
            "nested",
            f'{{"kind":"disburse","command_id":"{cid}-d","account":"atk","asset":"USD",'
            f'"legs":[{{"to":"x","to":"y","amount":1}}]}}'.encode(),
            "legs[0].to",
        ),
        (
            "command_id",
            f'{{"kind":"deposit","command_id":"{cid}-e","command_id":"{cid}-f",'
            f'"account":"atk","asset":"USD","amount":5}}'.encode(),
            "command_id",
        ),
    ]


async def test_duplicate_json_keys_are_refused_naming_the_key(stack: Stack) -> None:
    """Finding 3: `"kind":"withdraw","kind":"deposit"` deposited (last wins)."""
    cid = stack.id("dupkey")
    for name, body, key in _dup_body(cid):
        for target, sent, field_name in (
            ("/v1/commands", body, key),
            ("/v1/commands/batch", b'{"commands":[' + body + b"]}", f"commands[0].{key}"),
        ):
            reply = await one(
                stack.ingress.port,
                request_bytes("POST", target, signed_headers("POST", target, sent), sent),
            )
            problem = expect(reply, 400, field_name)
            assert problem["title"] == "duplicate key", (name, problem)
    stack.refused |= {f"{cid}-{s}" for s in "abcdef"}


SECURITY = ("Tally-Key-Id", "Tally-Timestamp", "Tally-Nonce", "Tally-Signature", "Idempotency-Key")


async def test_repeated_security_headers_are_refused_in_either_order(stack: Stack) -> None:
    """Finding 3: a valid plus a bogus Tally-Signature was accepted (first wins)."""
    for name in SECURITY:
        for valid_first in (True, False):
            cid = stack.id(f"hdr-{name}-{valid_first}")
            body = deposit(cid)
            key = cid if name == "Idempotency-Key" else None
            headers = signed_headers("POST", "/v1/commands", body, idempotency_key=key)
            at = [n for n, _ in headers].index(name)
            valid = headers[at][1]
            # Lower case: header names are case-insensitive, a repeat is one all the same.
            bogus = (name.lower(), "0" * 64 if name == "Tally-Signature" else valid + "x")
            headers.insert(at + 1 if valid_first else at, bogus)
            reply = await one(
                stack.ingress.port, request_bytes("POST", "/v1/commands", headers, body)
            )
            problem = expect(reply, 400, name)
            assert problem["title"] == "repeated header"
            stack.refused.add(cid)


async def test_repeated_prefer_wait_is_refused(stack: Stack) -> None:
    cid = stack.id("prefer")
    body = deposit(cid)
    headers = [
        *signed_headers("POST", "/v1/commands", body),
        ("Prefer", "wait=0"),
        ("Prefer", "wait=30"),
    ]
    expect(
        await one(stack.ingress.port, request_bytes("POST", "/v1/commands", headers, body)),
        400,
        "Prefer",
    )
    stack.refused.add(cid)


async def test_batch_items_sharing_a_command_id_are_refused_each(stack: Stack) -> None:
    """Finding 3: batch items sharing one command_id were all answered 202."""
    same, fine = stack.id("batch-same"), stack.id("batch-fine")
    items = [deposit(same), deposit(fine), deposit(same, amount=500), deposit(same, "atk-other")]
    body = b'{"commands":[' + b",".join(items) + b"]}"
    reply = await one(
        stack.ingress.port,
        request_bytes(
            "POST", "/v1/commands/batch", signed_headers("POST", "/v1/commands/batch", body), body
        ),
    )
    assert reply.status == 207, reply.body
    answers = reply.json["items"]
    assert [a["status"] for a in answers] == [422, 202, 422, 202]
    assert answers[0]["problem"]["field"] == "commands[0].command_id"
    assert answers[2]["problem"]["field"] == "commands[2].command_id"
    # The same command_id on another account is another command (idempotency is scoped by
    # account): accepted.
    assert answers[3]["account"] == "atk-other"
    stack.accepted |= {fine, same}  # `same` once: the one on atk-other
    stack.shared_id = same


# --- finding 5: slow and vanishing clients, and what aiohttp refuses ----------------


async def test_half_sent_bodies_then_close_are_counted_not_500(stack: Stack) -> None:
    """Finding 5: each was a status="500" and a traceback in the log."""
    for n in range(5):
        cid = stack.id(f"half-{n}")
        body = deposit(cid)
        request = request_bytes(
            "POST", "/v1/commands", signed_headers("POST", "/v1/commands", body), body
        )
        _, writer = await asyncio.open_connection("127.0.0.1", stack.ingress.port)
        writer.write(request[: len(request) - len(body) // 2])
        await writer.drain()
        await asyncio.sleep(0.2)
        if n % 2:
            writer.transport.abort()  # RST
        else:
            writer.close()  # FIN
        stack.refused.add(cid)
    await asyncio.sleep(0.5)
    metrics = await _metrics(stack.ingress.port)
    gone = _sample(
        metrics, "tally_ingress_client_disconnects_total", route="/v1/commands", method="POST"
    )
    assert gone is not None and gone >= 5, metrics
    log = stack.ingress.tail(2000)
    assert "Traceback" not in log and "Error handling request" not in log


async def test_a_slow_body_is_timed_out_with_408(stack: Stack) -> None:
    cid = stack.id("slow")
    body = deposit(cid)
    request = request_bytes(
        "POST", "/v1/commands", signed_headers("POST", "/v1/commands", body), body
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.ingress.port)
    try:
        writer.write(request[:-10])
        await writer.drain()
        started = time.monotonic()
        reply = await read_reply(reader, timeout_s=BODY_TIMEOUT_MS / 1000 + 15)
        assert reply is not None
        waited = time.monotonic() - started
    finally:
        writer.close()
    expect(reply, 408, "body")
    assert reply.closed
    assert waited >= BODY_TIMEOUT_MS / 1000 * 0.9
    stack.refused.add(cid)


async def test_a_body_shorter_than_its_content_length_is_timed_out(stack: Stack) -> None:
    cid = stack.id("short")
    body = deposit(cid)
    headers = signed_headers("POST", "/v1/commands", body)
    reply = await one(
        stack.ingress.port,
        request_bytes("POST", "/v1/commands", headers, body, length=len(body) + 50),
    )
    expect(reply, 408, "body")
    stack.refused.add(cid)


def _chunked(headers: list[tuple[str, str]], chunks: bytes) -> bytes:
    return request_bytes(
        "POST", "/v1/commands", [*headers, ("Transfer-Encoding", "chunked")], chunks, length=-1
    )


PARSER_ATTACKS: list[tuple[str, bytes, int, str | None]] = [
    ("bad request line", b"HELLO\r\n\r\n", 400, "request line"),
    ("bad method", b"P@ST /v1/commands HTTP/1.1\r\nHost: x\r\n\r\n", 400, "request line"),
    ("bad version", b"GET /livez HTTP/9.9\r\nHost: x\r\n\r\n", 400, None),
    ("tls hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40, 400, None),
    ("url too long", b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "url"),
    (
        "header too long",
        b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        431,
        "headers",
    ),
    (
        "header name too long",
        b"GET /livez HTTP/1.1\r\nHost: x\r\n" + b"X" * 9000 + b": 1\r\n\r\n",
        431,
        "headers",
    ),
    (
        "too many headers",
        b"GET /livez HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: 1\r\n" % i for i in range(200))
        + b"\r\n",
        431,
        "headers",
    ),
    (
        "repeated Content-Type",
        b"POST /v1/commands HTTP/1.1\r\nHost: x\r\nContent-Type: "
        b"application/json\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}",
        400,
        "Content-Type",
    ),
    (
        "repeated Content-Length",
        b"POST /v1/commands HTTP/1.1\r\nHost: x\r\nContent-Length: 2"
        b"\r\nContent-Length: 3\r\n\r\n{}",
        400,
        None,
    ),
    (
        "length and chunked (smuggling)",
        b"POST /v1/commands HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        None,
    ),
    ("nul in a header", b"GET /livez HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400, None),
    ("folded header", b"GET /livez HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400, None),
    ("no Host on 1.1", b"GET /livez HTTP/1.1\r\n\r\n", 400, None),
    ("space before colon", b"GET /livez HTTP/1.1\r\nHost : x\r\n\r\n", 400, None),
    (
        "huge Content-Length",
        b"POST /v1/commands HTTP/1.1\r\nHost: x\r\nContent-Length: "
        b"99999999999999999999999\r\n\r\n{}",
        400,
        None,
    ),
    (
        "negative Content-Length",
        b"POST /v1/commands HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
        400,
        None,
    ),
    (
        "unknown Transfer-Encoding",
        b"POST /v1/commands HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{}",
        400,
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "data", "status", "field_name"), PARSER_ATTACKS, ids=[a[0] for a in PARSER_ATTACKS]
)
async def test_what_aiohttp_refuses_is_a_problem_too(
    stack: Stack, name: str, data: bytes, status: int, field_name: str | None
) -> None:
    """Finding 5: aiohttp's own refusals answered text/plain, and 400 for everything."""
    (reply,) = await send(stack.ingress.port, data, eof=True)
    expect(reply, status, field_name)
    assert reply.closed, name


async def test_what_aiohttp_refuses_is_counted_as_unparsed(stack: Stack) -> None:
    """No route or method was read: counted under route="unparsed", method="other"."""

    def unparsed(metrics: str) -> float:
        found = _sample(
            metrics, "tally_ingress_requests_total", route="unparsed", method="other", status="414"
        )
        return found or 0.0

    before = unparsed(await _metrics(stack.second.port))
    data = b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    for _ in range(3):
        (reply,) = await send(stack.second.port, data, eof=True)
        expect(reply, 414, "url")
    assert unparsed(await _metrics(stack.second.port)) == before + 3


async def test_bad_chunked_bodies_are_400_and_produce_nothing(stack: Stack) -> None:
    for n, (content, chunks) in enumerate(
        [
            (b"{}", b"zz\r\n{}\r\n0\r\n\r\n"),  # a chunk size that is not hex
            (b"{}", b"2\r\n{}XX0\r\n\r\n"),  # no CRLF after the chunk
            (b"{}", b"-2\r\n{}\r\n0\r\n\r\n"),  # a negative size
            (b"{}", b"2\r\n{}\r\n"),  # no last chunk: the body never ends (408)
            # An extension of 9,000 bytes is read past; "hello" is then not JSON.
            (b"hello", b"5;" + b"e" * 9000 + b"\r\nhello\r\n0\r\n\r\n"),
        ]
    ):
        headers = signed_headers("POST", "/v1/commands", content)
        reply = await one(stack.ingress.port, _chunked(headers, chunks))
        want = 408 if n == 3 else 400
        expect(reply, want, "body")
        assert n == 4 or reply.json["title"] in ("malformed body framing", "body too slow"), (
            n,
            reply.json,
        )
    stack.refused.add(stack.id("chunk"))
    # A correct chunked body is a command.
    cid = stack.id("chunk-ok")
    body = deposit(cid)
    chunks = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    accepted(
        stack,
        await one(
            stack.ingress.port, _chunked(signed_headers("POST", "/v1/commands", body), chunks)
        ),
        cid,
    )


async def test_bad_chunking_after_the_headers_were_read_is_400_at_once(
    stack: Stack,
) -> None:
    """The headers arrive first (the handler is reading the body), then a broken chunk:
    aiohttp's parser drops the body without telling the reader; ingress.protocol hands
    the reader the error, so the answer is a 400 at once, not a 408 at the deadline."""
    cid = stack.id("chunk-late")
    body = deposit(cid)
    request = _chunked(signed_headers("POST", "/v1/commands", body), b"")
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.ingress.port)
    try:
        writer.write(request)
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b"zz\r\n" + body + b"\r\n0\r\n\r\n")
        await writer.drain()
        reply = await read_reply(reader, timeout_s=BODY_TIMEOUT_MS / 1000 + 15)
    finally:
        writer.close()
    assert reply is not None
    assert expect(reply, 400, "body")["title"] == "malformed body framing"
    assert reply.closed
    stack.refused.add(cid)


async def test_a_chunked_body_past_the_size_limit_is_413(stack: Stack) -> None:
    cid = stack.id("chunk-big")
    body = deposit(cid)[:-1] + b',"memo":"' + b"x" * 70_000 + b'"}'
    chunks = (
        b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 8192]), body[i : i + 8192])
            for i in range(0, len(body), 8192)
        )
        + b"0\r\n\r\n"
    )
    reply = await one(
        stack.ingress.port, _chunked(signed_headers("POST", "/v1/commands", body), chunks)
    )
    expect(reply, 413, "body")
    stack.refused.add(cid)


async def test_pipelined_garbage_after_a_good_request(stack: Stack) -> None:
    cid = stack.id("pipelined")
    body = deposit(cid)
    request = request_bytes(
        "POST", "/v1/commands", signed_headers("POST", "/v1/commands", body), body
    )
    replies = await send(stack.ingress.port, request + b"GARBAGE\r\n\r\n", replies=2)
    # aiohttp's parser reads both from one packet and, failing on the second, forgets the
    # first: one 400 for the pair, and nothing produced. (Were it to answer the good one
    # first, that one would be a 202 and a command.)
    if len(replies) == 2:
        accepted(stack, replies[0], cid)
    else:
        stack.refused.add(cid)
    expect(replies[-1], 400, "request line")


async def test_a_declared_length_over_the_limit_is_413_before_the_body(stack: Stack) -> None:
    headers = signed_headers("POST", "/v1/commands", b"{}")
    reply = await one(
        stack.ingress.port, request_bytes("POST", "/v1/commands", headers, b"", length=5_000_000)
    )
    expect(reply, 413, "body")


async def test_an_empty_idempotency_key_is_400_not_a_second_meaning(stack: Stack) -> None:
    """An empty header signs as an absent one (an empty line); it must not pass as one."""
    cid = stack.id("empty-key")
    body = deposit(cid)
    headers = [*signed_headers("POST", "/v1/commands", body), ("Idempotency-Key", "")]
    expect(
        await one(stack.ingress.port, request_bytes("POST", "/v1/commands", headers, body)),
        400,
        "Idempotency-Key",
    )
    stack.refused.add(cid)


async def test_an_upper_case_signature_is_not_a_way_around_the_replay_check(stack: Stack) -> None:
    cid = stack.id("upper")
    body = deposit(cid)
    headers = signed_headers("POST", "/v1/commands", body)
    accepted(
        stack,
        await one(stack.ingress.port, request_bytes("POST", "/v1/commands", headers, body)),
        cid,
    )
    upper = [(n, v.upper() if n == "Tally-Signature" else v) for n, v in headers]
    expect(
        await one(stack.second.port, request_bytes("POST", "/v1/commands", upper, body)),
        401,
        "Tally-Signature",
    )


async def test_a_signed_non_ascii_idempotency_key_is_400_not_401_or_500(stack: Stack) -> None:
    body = deposit(None)
    key = "k\u00e9y"  # sent as UTF-8; signed as the server reads it
    headers = signed_headers("POST", "/v1/commands", body, idempotency_key=key)
    reply = await one(stack.ingress.port, request_bytes("POST", "/v1/commands", headers, body))
    expect(reply, 400, "Idempotency-Key")


# --- the checks over everything above ----------------------------------------------


async def _metrics(port: int) -> str:
    (reply,) = await send(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    return reply.body.decode()


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def _commands_on_topic(stack: Stack) -> list[dict[str, Any]]:
    topic = stack.engine.topics.commands.name
    consumer = AIOKafkaConsumer(
        bootstrap_servers=stack.settings.kafka_bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        # Explicit offsets (a lazy seek_to_beginning right after assign() can lose to the
        # reset the assignment started: see harness.collector).
        for tp, offset in (await consumer.beginning_offsets(tps)).items():
            consumer.seek(tp, offset)
        out: list[dict[str, Any]] = []
        read = dict.fromkeys(tps, 0)  # the next offset not yet read, per partition
        deadline = time.monotonic() + 30
        while any(read[tp] < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, (read, ends)
            batches = await consumer.getmany(*tps, timeout_ms=500)
            for tp, records in batches.items():
                out += [msgspec.json.decode(r.value) for r in records if r.value]
                if records:
                    read[tp] = records[-1].offset + 1
        return out
    finally:
        await consumer.stop()


async def test_zz_nothing_refused_was_produced_and_nothing_was_a_500(stack: Stack) -> None:
    """Runs last (module order): the topic holds exactly the accepted commands."""
    assert stack.accepted and stack.refused
    commands = await _commands_on_topic(stack)
    ids = [c.get("command_id") for c in commands]
    produced = {i for i in ids if isinstance(i, str) and i.endswith(stack.unique)}
    assert produced == stack.accepted, produced ^ stack.accepted
    assert not produced & stack.refused
    if stack.shared_id is not None:
        on = [c["account"] for c in commands if c.get("command_id") == stack.shared_id]
        assert on == ["atk-other"]
    # No amount of the duplicate-key bodies reached the topic.
    assert all(c.get("amount") != 500000 for c in commands)
    for proc in (stack.ingress, stack.second):
        text = await _metrics(proc.port)
        assert 'status="500"' not in text, text
        assert not re.search(r'status="5\d\d"', text.replace('status="503"', "")), text
        log = proc.tail(5000)
        assert "Traceback" not in log, log[-3000:]
    # The engine is unharmed: a signed command after all of this is applied.
    cid = stack.id("after")
    body = deposit(cid, "atk-after")
    headers = [*signed_headers("POST", "/v1/commands", body), ("Prefer", "wait=15")]
    reply = await one(stack.ingress.port, request_bytes("POST", "/v1/commands", headers, body))
    assert reply.status == 200 and reply.json["status"] == "applied", reply.body
