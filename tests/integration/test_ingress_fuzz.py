"""The live ingress against its own OpenAPI document, fuzzed with schemathesis.

A real `tally ingress` child process (with a client key) and a real engine worker on
topics of their own, so that `Prefer: wait` and `?consistency=strong` are answered by
the engine rather than timing out; a few rows and keys stand in for the sinks' output
so that the reads have something to return. For every operation of the document the
ingress serves at /openapi.json, schemathesis makes up requests that fit the document
(positive), requests that break it (negative), and its coverage phase's boundary
values, and every answer must:

  - not be a 5xx (the stack is healthy, so a 503 is as much a bug as a 500),
  - have a status code, a content type and a body the document describes for it.

Requests under /v1 go out twice: signed correctly (by a `requests` auth hook on the
final prepared request, so the signature covers exactly the bytes sent; the server
must never answer those 401), and unsigned or signed wrong, which must be a 401.
Stateful checks and "valid data must be accepted" are left out on purpose: the rate
limiter and the signature check legitimately refuse requests that look valid.

Then: the served document is `ingress.openapi.document()`, the aiohttp router and the
document list the same routes and methods, and a list of inputs the generators rarely
reach (those marked "Found by fuzzing" were 500s, 503s or wrong answers once).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hypothesis_settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from core.settings import Settings
from ingress import signing
from ingress.app import Ingress
from ingress.openapi import document
from ingress.waiting import prefer_wait
from sinks.pg import quote
from sinks.redis_store import assets_key, balance_key
from tests.integration.stack_support import scratch, started
from topics.shard import shard_of

KEY_ID = "fuzz"
SECRET = "fuzz-secret-0123456789abcdef"
PARTITIONS = 4
# Per operation and generation mode. Without TALLY_FUZZ_SEED (CI, `make test`) the seed
# is fixed: the same requests go out on every run, so a failure here reproduces. `make
# fuzz` draws a fresh seed each run (printed; TALLY_FUZZ_SEED=N repeats that run) and
# sends TALLY_FUZZ_EXAMPLES requests per operation and mode.
EXAMPLES = int(os.environ.get("TALLY_FUZZ_EXAMPLES", "50"))
FUZZ_SEED: int | None = (
    int(os.environ["TALLY_FUZZ_SEED"]) if os.environ.get("TALLY_FUZZ_SEED") else None
)
# `Prefer: wait=N` ends as soon as the result arrives, which with a running engine is
# well under a second; a generated N above this is lowered to it so that one lost
# result cannot cost 30 s of the run.
WAIT_CAP_S = 2
REQUEST_TIMEOUT_S = 15
# Set here rather than taken from the environment: the 413 cases depend on it.
BODY_MAX_BYTES = 1024 * 1024
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
DOCUMENT: dict[str, Any] = document()
OPERATIONS = [
    (path, method.upper(), operation)
    for path, item in DOCUMENT["paths"].items()
    for method, operation in item.items()
]
# How requests are made up: schemathesis's hypothesis strategies for data that fits the
# document (positive) and data that breaks it (negative), and its coverage phase, a
# fixed list of boundary values, missing and wrong-typed parameters, other content
# types and undocumented methods, in both modes.
POSITIVE, NEGATIVE, COVERAGE = "positive", "negative", "coverage"


def _inputs(operation: dict[str, Any]) -> bool:
    return bool(operation.get("parameters")) or "requestBody" in operation


# Negative generation needs something to break: a parameter or a body.
FUZZED = [
    (path, method, mode)
    for path, method, operation in OPERATIONS
    for mode in (POSITIVE, NEGATIVE, COVERAGE)
    if mode != NEGATIVE or _inputs(operation)
]
UNSIGNED = [
    (path, method, mode)
    for path, method, operation in OPERATIONS
    if operation.get("security")
    for mode in (POSITIVE, NEGATIVE, COVERAGE)
]
SIGNATURE_HEADERS = (signing.KEY_ID, signing.TIMESTAMP, signing.NONCE, signing.SIGNATURE)


# --- the live stack ---------------------------------------------------------------


# What the sinks would have written, so that the 200 and 409 answers of the reads are
# checked against the document too (no sink runs here). "0" is the id and account the
# generators start from, so generated requests reach these rows as well.
RECORDED = [
    # (command_id, account, kind, status, reason)
    ("0", "0", "deposit", "applied", None),
    ("edge-seen", "edge-a", "withdraw", "rejected", "insufficient_funds"),
    ("edge-twice", "edge-a", "deposit", "applied", None),
    ("edge-twice", "edge-d", "deposit", "applied", None),  # another shard than edge-a
]
CACHED = [("0", "USD", 5, 0, 1), ("edge-a", "USD", 100, 20, 7), ("edge-a", "EUR", -3, 0, 2)]


async def _seed(settings: Settings, prefix: str) -> None:
    """Rows and keys in the places the ingress reads, as the sinks would write them."""
    assert shard_of("edge-a", PARTITIONS) != shard_of("edge-d", PARTITIONS)
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        await conn.executemany(
            f"INSERT INTO {quote(prefix)}.command_results"
            " (shard_id, command_id, account, kind, status, reason, at)"
            " VALUES ($1, $2, $3, $4, $5, $6, now())",
            [(shard_of(r[1], PARTITIONS), *r) for r in RECORDED],
        )
    finally:
        await conn.close()
    client = aioredis.from_url(settings.redis_url)
    try:
        for account, asset, available, held, seq in CACHED:
            shard = shard_of(account, PARTITIONS)
            await client.sadd(assets_key(prefix, shard, account), asset)
            await client.hset(
                balance_key(prefix, shard, account, asset),
                mapping={"available": available, "held": held, "seq": seq},
            )
    finally:
        await client.aclose()


async def _unseed(settings: Settings, prefix: str) -> None:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote(prefix)} CASCADE")
    finally:
        await conn.close()
    client = aioredis.from_url(settings.redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
async def ingress_url(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """An ingress with one client key and an engine worker, on a prefix of their own.
    The ingress goes first: it creates the topics and the PostgreSQL schema."""
    d = scratch(settings, tmp_path_factory, "it-fz", PARTITIONS)
    ingress = d.ingress("ingress", keys={KEY_ID: SECRET}, ingress_body_max_bytes=BODY_MAX_BYTES)
    try:
        async with started([ingress], [d.engine("state")]):
            await _seed(settings, d.prefix)
            yield ingress.url
    finally:
        await _unseed(settings, d.prefix)


@pytest.fixture(scope="module")
def served(ingress_url: str) -> dict[str, Any]:
    response = requests.get(f"{ingress_url}/openapi.json", timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def schema(served: dict[str, Any]) -> OpenApiSchema:
    # From the dict rather than the URL: schemathesis leaves out the operation a schema
    # was loaded from, and GET /openapi.json is an operation like the others.
    return schemathesis.openapi.from_dict(served)


# --- signing ------------------------------------------------------------------------


def _wire_body(r: requests.PreparedRequest) -> bytes:
    """The body exactly as it goes out; a str body is made bytes here, once, so that
    what is signed and what is sent cannot differ."""
    body = r.body
    if body is None:
        return b""
    if isinstance(body, str):
        r.body = body.encode()
        r.prepare_content_length(r.body)
        return r.body
    assert isinstance(body, bytes), f"streamed bodies are not signed here: {type(body)}"
    return body


def _wire_header(r: requests.PreparedRequest, name: str) -> bytes | None:
    """A header's value as it goes out (http.client sends a str as Latin-1)."""
    value = r.headers.get(name)
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode("latin-1")


def _sign(
    r: requests.PreparedRequest,
    body: bytes,
    *,
    key_id: str = KEY_ID,
    secret: bytes = SECRET.encode(),
    target: str | None = None,
    now: float | None = None,
    idempotency_key: bytes | None = None,
    content_type: bytes | None = None,
) -> dict[str, str]:
    """The signature headers for r as sent (or with one input changed)."""
    assert r.method is not None
    return signing.sign(
        key_id,
        secret,
        r.method,
        r.path_url if target is None else target,
        body,
        idempotency_key=idempotency_key or _wire_header(r, signing.IDEMPOTENCY_KEY),
        content_type=content_type or _wire_header(r, signing.CONTENT_TYPE),
        now=now,
    )


class Signed(requests.auth.AuthBase):
    """Sign the final request: method, path and query as sent, the body's bytes, and
    the Idempotency-Key and Content-Type it sends."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        body = _wire_body(r)
        for name in SIGNATURE_HEADERS:
            r.headers.pop(name, None)
        r.headers.update(_sign(r, body))
        return r


def _missing(r: requests.PreparedRequest, body: bytes) -> dict[str, str]:
    return {}


def _generated(r: requests.PreparedRequest, body: bytes) -> dict[str, str]:
    # Whatever schemathesis generated for the three headers (often some are absent).
    return {name: r.headers[name] for name in SIGNATURE_HEADERS if name in r.headers}


def _malformed(r: requests.PreparedRequest, body: bytes) -> dict[str, str]:
    return {signing.KEY_ID: "no such key!", signing.TIMESTAMP: "soon", signing.SIGNATURE: "0x"}


def _wrong_secret(r: requests.PreparedRequest, body: bytes) -> dict[str, str]:
    return _sign(r, body, secret=b"not-the-secret-0123456789")


def _unknown_key(r: requests.PreparedRequest, body: bytes) -> dict[str, str]:
    return _sign(r, body, key_id="nobody")


def _stale(r: requests.PreparedRequest, body: bytes) -> dict[str, str]:
    return _sign(r, body, now=time.time() - 3600)


def _other_target(r: requests.PreparedRequest, body: bytes) -> dict[str, str]:
    return _sign(r, body, target=r.path_url + "x")


def _other_body(r: requests.PreparedRequest, body: bytes) -> dict[str, str]:
    return _sign(r, body + b" ")


def _other_idempotency_key(r: requests.PreparedRequest, body: bytes) -> dict[str, str]:
    return _sign(r, body, idempotency_key=(_wire_header(r, signing.IDEMPOTENCY_KEY) or b"") + b"x")


def _other_content_type(r: requests.PreparedRequest, body: bytes) -> dict[str, str]:
    return _sign(r, body, content_type=(_wire_header(r, signing.CONTENT_TYPE) or b"") + b"x")


class Unsigned(requests.auth.AuthBase):
    """No signature, or one that must not pass: each request gets the next of the ways
    in turn."""

    ways: tuple[Callable[[requests.PreparedRequest, bytes], dict[str, str]], ...] = (
        _missing,
        _generated,
        _malformed,
        _wrong_secret,
        _unknown_key,
        _stale,
        _other_target,
        _other_body,
        _other_idempotency_key,
        _other_content_type,
    )

    def __init__(self) -> None:
        self.turn = itertools.cycle(self.ways)
        self.last = ""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        body = _wire_body(r)
        way = next(self.turn)
        headers = way(r, body)
        for name in SIGNATURE_HEADERS:
            r.headers.pop(name, None)
        r.headers.update(headers)
        self.last = way.__name__.lstrip("_")
        return r


@pytest.fixture
def signed() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.auth = Signed()
        yield session


# --- running generated cases --------------------------------------------------------


def _bound_wait(case: Case) -> None:
    """Lower a `Prefer` the server would honour with a wait above WAIT_CAP_S."""
    value = case.headers.get("Prefer") if case.headers else None
    if not isinstance(value, str):
        return
    try:
        wait_s = prefer_wait(value)
    except Exception:
        return  # refused (400) or a server bug; either way it does not wait
    if wait_s > WAIT_CAP_S:
        case.headers["Prefer"] = f"wait={WAIT_CAP_S}"


def _fuzz(
    schema: OpenApiSchema, path: str, method: str, mode: str, each: Callable[[Case], None]
) -> None:
    """Call `each` on every request made up for one operation in one mode."""
    operation = schema[path][method]
    if mode == COVERAGE:
        generation = schema.config.generation_for(operation=operation, phase="coverage")
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
        for case in schema.iter_coverage_cases(
            operation, generation_modes=modes, generation_config=generation
        ):
            _bound_wait(case)
            each(case)
        return

    @hypothesis_settings(
        max_examples=EXAMPLES,
        derandomize=FUZZ_SEED is None,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def run(case: Case) -> None:
        _bound_wait(case)
        each(case)

    if FUZZ_SEED is None:
        run()
        return
    try:
        seed(FUZZ_SEED)(run)()
    except Exception as exc:
        exc.add_note(f"TALLY_FUZZ_SEED={FUZZ_SEED} TALLY_FUZZ_EXAMPLES={EXAMPLES} repeats this run")
        raise


@pytest.mark.parametrize(("path", "method", "mode"), FUZZED)
def test_signed_requests_are_answered_as_documented(
    ingress_url: str,
    schema: OpenApiSchema,
    signed: requests.Session,
    path: str,
    method: str,
    mode: str,
) -> None:
    def each(case: Case) -> None:
        response = case.call(base_url=ingress_url, session=signed, timeout=REQUEST_TIMEOUT_S)
        case.validate_response(response, checks=CHECKS)
        # The signature covers what was sent, so the server must agree with it, however
        # odd the path, query or body.
        assert response.status_code != 401, response.text

    _fuzz(schema, path, method, mode, each)


@pytest.mark.parametrize(("path", "method", "mode"), UNSIGNED)
def test_requests_not_signed_right_get_401(
    ingress_url: str, schema: OpenApiSchema, path: str, method: str, mode: str
) -> None:
    unsigned = Unsigned()
    session = requests.Session()
    session.auth = unsigned

    def each(case: Case) -> None:
        response = case.call(base_url=ingress_url, session=session, timeout=REQUEST_TIMEOUT_S)
        case.validate_response(response, checks=CHECKS)
        if case.method != method:
            # A method the route does not have: the router answers before any handler.
            assert response.status_code == 405, response.text
            return
        # The signature is checked before anything else about the request (only an
        # oversized body is refused earlier, and these bodies are small).
        # Found by fuzzing: the handlers once checked query parameters before the
        # signature, telling an unsigned caller 400 "unknown query parameter".
        assert response.status_code == 401, (
            f"signature {unsigned.last}: {response.status_code} {response.text}\n"
            f"{case.as_curl_command(headers=dict(response.request.headers))}"
        )
        assert response.headers.get("www-authenticate") == ['Tally-HMAC-SHA256 realm="tally"']

    with session:
        _fuzz(schema, path, method, mode, each)


# --- the document and the server agree --------------------------------------------


def test_the_served_document_is_the_code_s_document(
    served: dict[str, Any], schema: OpenApiSchema
) -> None:
    assert served == msgspec.json.decode(msgspec.json.encode(document()))
    schema.validate()  # a valid OpenAPI 3.1 document, by schemathesis's own validator


async def test_every_route_is_documented_with_its_methods_and_nothing_else(
    settings: Settings,
) -> None:
    keyed = msgspec.structs.replace(settings, ingress_keys=f"{KEY_ID}:{SECRET}")
    ingress = Ingress(keyed)
    try:
        routed: dict[str, set[str]] = {}
        for route in ingress.app.router.routes():
            resource = route.resource
            assert resource is not None
            routed.setdefault(resource.canonical, set()).add(route.method)
    finally:
        # Nothing was started; this closes the Kafka clients the constructor made.
        await ingress._close(ingress.app)
    documented = {path: {m.upper() for m in item} for path, item in DOCUMENT["paths"].items()}
    assert routed == documented
    # Every /v1 operation is signed (the server checks signatures there and only there).
    for path, method, operation in OPERATIONS:
        assert bool(operation.get("security")) == path.startswith("/v1/"), (method, path)


# --- inputs the generators rarely reach ---------------------------------------------
#
# Each must be answered as documented, like the generated ones, and with the status
# given (None: any documented one). The notes "Found by fuzzing" say what the ingress
# once got wrong there.

_DEPOSIT = {"kind": "deposit", "account": "edge-a", "asset": "USD", "amount": 1}


def _batch(n: int, tag: str) -> dict[str, Any]:
    return {"commands": [{**_DEPOSIT, "command_id": f"edge-{tag}{i}"} for i in range(n)]}


EDGES = [
    # Found by fuzzing: "²" passes str.isdigit() but int() refuses it (it was a 500).
    pytest.param(
        "/v1/commands",
        "POST",
        # A header str goes out as Latin-1: these two characters are the UTF-8 bytes
        # of "²", which is what the server decodes.
        {"headers": {"Prefer": "wait=\u00c2\u00b2"}, "body": {**_DEPOSIT, "command_id": "e1"}},
        True,
        400,
        id="prefer-wait-superscript-two",
    ),
    pytest.param(
        "/v1/commands",
        "POST",
        # The UTF-8 bytes of "١" (ARABIC-INDIC DIGIT ONE): int() takes it.
        {"headers": {"Prefer": "wait=\u00d9\u00a1"}, "body": {**_DEPOSIT, "command_id": "e2"}},
        True,
        None,
        id="prefer-wait-arabic-indic-one",
    ),
    # Found by fuzzing: int() refuses strings of more than 4300 digits
    # (sys.int_info.str_digits_check_threshold); these two were 500s.
    pytest.param(
        "/v1/commands",
        "POST",
        {"headers": {"Prefer": "wait=" + "9" * 5000}, "body": {**_DEPOSIT, "command_id": "e6"}},
        True,
        400,
        id="prefer-wait-5000-nines",
    ),
    pytest.param(
        "/v1/commands",
        "POST",
        # 1 s with leading zeros (RFC 9110 delta-seconds allow them): 200 or 400 both do.
        {
            "headers": {"Prefer": "wait=" + "0" * 5000 + "1"},
            "body": {**_DEPOSIT, "command_id": "e7"},
        },
        True,
        None,
        id="prefer-wait-5001-digits-of-one",
    ),
    pytest.param(
        "/v1/commands",
        "POST",
        {"headers": {"Prefer": "wait=31"}, "body": {**_DEPOSIT, "command_id": "e3"}},
        True,
        400,
        id="prefer-wait-31",
    ),
    pytest.param(
        "/v1/commands",
        "POST",
        {"headers": {"Prefer": "wait=5"}, "body": {**_DEPOSIT, "command_id": "e4"}},
        True,
        200,
        id="prefer-wait-result",
    ),
    pytest.param(
        "/v1/commands",
        "POST",
        {"body": b"[" * 100_000 + b"]" * 100_000},
        True,
        400,
        id="deeply-nested-json",
    ),
    # The size is checked before the signature: a 413 whether signed or not.
    pytest.param(
        "/v1/commands/batch",
        "POST",
        {"body": b" " * (BODY_MAX_BYTES + 1)},
        True,
        413,
        id="body-too-large",
    ),
    pytest.param(
        "/v1/commands/batch",
        "POST",
        {"body": b" " * (BODY_MAX_BYTES + 1)},
        False,
        413,
        id="unsigned-body-too-large",
    ),
    pytest.param(
        "/v1/commands/batch", "POST", {"body": _batch(1000, "b")}, True, 202, id="batch-of-1000"
    ),
    pytest.param(
        "/v1/commands/batch", "POST", {"body": _batch(1001, "c")}, True, 422, id="batch-of-1001"
    ),
    pytest.param(
        "/v1/commands/{command_id}",
        "GET",
        {"path_parameters": {"command_id": "edge-seen"}},
        True,
        200,
        id="command-recorded",
    ),
    pytest.param(
        "/v1/commands/{command_id}",
        "GET",
        {"path_parameters": {"command_id": "edge-twice"}},
        True,
        409,
        id="command-recorded-for-two-accounts",
    ),
    pytest.param(
        "/v1/commands/{command_id}",
        "GET",
        {"path_parameters": {"command_id": "edge-twice"}, "query": {"account": "edge-d"}},
        True,
        200,
        id="command-recorded-for-two-accounts-one-named",
    ),
    pytest.param(
        "/v1/accounts/{account}/balances",
        "GET",
        {"path_parameters": {"account": "edge-a"}},
        True,
        200,
        id="cached-balances",
    ),
    # Account ids made of dots are valid (ACCOUNT_ID_PATTERN). requests would drop a
    # literal dot segment from the URL; percent-encoded, requests unquotes it back to
    # "." on the wire, and the server reads the account "." or "..".
    pytest.param(
        "/v1/accounts/{account}/balances",
        "GET",
        {"path_parameters": {"account": "%2E%2E"}},
        True,
        200,
        id="cached-balances-of-account-dot-dot",
    ),
    # Found by fuzzing: the forwarded URL f"{owner}/balances/{account}" was
    # dot-normalised by yarl, "/balances/.." to "/", and the engine's 404 became 503.
    pytest.param(
        "/v1/accounts/{account}/balances",
        "GET",
        {"path_parameters": {"account": "%2E%2E"}, "query": {"consistency": "strong"}},
        True,
        200,
        id="strong-balances-of-account-dot-dot",
    ),
    # Found by fuzzing: as above, "/balances/." became "/balances/".
    pytest.param(
        "/v1/accounts/{account}/balances",
        "GET",
        {"path_parameters": {"account": "%2E"}, "query": {"consistency": "strong"}},
        True,
        200,
        id="strong-balances-of-account-dot",
    ),
    pytest.param(
        "/v1/commands/{command_id}",
        "GET",
        {"path_parameters": {"command_id": "%2E%2E"}, "query": {"account": ".."}},
        True,
        404,
        id="command-id-dot-dot",
    ),
    # Found by fuzzing: query parameters were checked before the signature, so an
    # unsigned request was told 400 "unknown query parameter" instead of 401.
    pytest.param(
        "/v1/commands",
        "POST",
        {"query": {"x": "1"}, "body": {**_DEPOSIT, "command_id": "e5"}},
        False,
        401,
        id="unsigned-post-with-unknown-query",
    ),
    pytest.param(
        "/v1/accounts/{account}/balances",
        "GET",
        {"path_parameters": {"account": "edge-a"}, "query": {"x": "1"}},
        False,
        401,
        id="unsigned-get-with-unknown-query",
    ),
]


@pytest.mark.parametrize(("path", "method", "arguments", "sign", "status"), EDGES)
def test_edge_inputs_are_answered_as_documented(
    ingress_url: str,
    schema: OpenApiSchema,
    signed: requests.Session,
    path: str,
    method: str,
    arguments: dict[str, Any],
    sign: bool,
    status: int | None,
) -> None:
    case = schema[path][method].Case(media_type="application/json", **arguments)
    session = signed if sign else None
    response = case.call(base_url=ingress_url, session=session, timeout=REQUEST_TIMEOUT_S)
    case.validate_response(response, checks=CHECKS)
    if status is not None:
        assert response.status_code == status, response.text
