"""The OpenAPI 3.1 document of the ingress, served at /openapi.json.

Command and result schemas are generated from `topics.schema` (the one definition), and
the response bodies from the structs below, so the document cannot describe a field
the code does not have. tests/integration/test_ingress_fuzz.py runs schemathesis
against the live server to check that every answer matches this document.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from ingress import signing, subscriptions
from ingress.commands import BATCH_MAX
from topics import limits
from topics.schema import PublicCommand, Result


class Accepted(msgspec.Struct, kw_only=True):
    """The broker acknowledged the command (acks=all); its result comes later."""

    command_id: str
    account: str
    kind: str
    status: str
    partition: int
    offset: int


class BatchItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One command of a batch: 202 accepted (with partition and offset), 422 invalid
    (with its problem) or 503 not acknowledged in time (retry it)."""

    index: int
    status: int
    command_id: str | None = None
    account: str | None = None
    partition: int | None = None
    offset: int | None = None
    problem: dict[str, Any] | None = None
    # With `Prefer: wait=N`: the item's result event when it came in time (status 200).
    result: Result | None = None


class BatchAnswer(msgspec.Struct, kw_only=True):
    accepted: int
    invalid: int
    unavailable: int
    items: list[BatchItem]
    # With `Prefer: wait=N`: how many items carry their result.
    answered: int | None = None


class BatchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    commands: Annotated[list[PublicCommand], msgspec.Meta(min_length=1, max_length=BATCH_MAX)]


class BalanceOut(msgspec.Struct, kw_only=True):
    available: int
    held: int
    seq: int


class Balances(msgspec.Struct, kw_only=True):
    """Current balances (cached, strong), or as they were (`projection`: `at_ms` or
    `seq` given, each balance's `seq` the last entry it reflects)."""

    account: str
    shard_id: int
    consistency: str
    balances: dict[str, BalanceOut]
    at_ms: int | None = None
    seq: int | None = None


class CommandRecord(msgspec.Struct, kw_only=True):
    """The first decision the engine took on a command id, from PostgreSQL."""

    shard_id: int
    command_id: str
    account: str
    kind: str
    status: str
    reason: str | None
    at_ms: int
    reference: str | None
    metadata: dict[str, str] | None


# --- the ledger's reads (issue 16; ingress.reads) -----------------------------------


class HistoryEntry(msgspec.Struct, kw_only=True):
    """One balance change: what moved, the balance after it, and its command's own
    reference and metadata."""

    seq: int
    command_id: str
    kind: str
    delta_available: int
    delta_held: int
    available: int
    held: int
    at_ms: int
    reference: str | None
    metadata: dict[str, str] | None


class HistoryPage(msgspec.Struct, kw_only=True):
    """Entries oldest first (seq ascending); `next` is the link to the following page
    when this one is full, else null (poll the last seq as `after_seq` for newer)."""

    account: str
    asset: str
    shard_id: int
    order: str
    entries: list[HistoryEntry]
    next: str | None


class CommandsByReference(msgspec.Struct, kw_only=True):
    reference: str
    commands: list[CommandRecord]
    truncated: bool


class AccountDetails(msgspec.Struct, kw_only=True):
    """From the owning engine worker's tables (strong)."""

    account: str
    shard_id: int
    consistency: str
    status: str
    assets: list[str]
    overdraft_limits: dict[str, int]
    last_seq: dict[str, int]


class Ready(msgspec.Struct, kw_only=True):
    ready: bool
    checks: dict[str, str]


class Live(msgspec.Struct, kw_only=True):
    status: str


_PROBLEM = {
    "type": "object",
    "description": "RFC 9457 problem details; `field` names the body field (JSON path), "
    "header, query or path parameter at fault.",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "field": {"type": "string"},
        "failing": {"type": "array", "items": {"type": "string"}},
        "checks": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

_STATUS_TEXT = {
    400: "Malformed request (JSON, header, query or path parameter); `field` says which.",
    401: "Missing, malformed, stale, wrong or already used signature; `field` names the header.",
    404: "Not found.",
    405: "Method not allowed.",
    408: "The body did not arrive within TALLY_INGRESS_BODY_TIMEOUT_MS.",
    409: "The command id was used by several accounts (name one with ?account=), or "
    "too many subscriptions.",
    413: "Body larger than TALLY_INGRESS_BODY_MAX_BYTES.",
    414: "Request line (URL) too long.",
    415: "Content-Type is not application/json.",
    422: "Well-formed JSON that breaks the command (or subscription) schema; `field` says where.",
    429: "Rate limit exceeded; see Retry-After.",
    431: "A header line too long, or too many headers.",
    503: "A dependency is unavailable; see Retry-After.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _problems(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {
            "description": _STATUS_TEXT[status],
            "content": {"application/problem+json": {"schema": _ref("Problem")}},
        }
        for status in statuses
    }


_SIGNED: list[dict[str, list[str]]] = [{"keyId": [], "timestamp": [], "nonce": [], "signature": []}]
# 503 on every /v1 route: the replay check needs Redis (and fails closed without it).
_V1_ERRORS = (400, 401, 404, 405, 408, 413, 414, 429, 431, 503)


def document() -> dict[str, Any]:
    (command_schema, *_), components = msgspec.json.schema_components(
        [PublicCommand, Result, Accepted, BatchAnswer, BatchRequest, Balances, CommandRecord,
         Ready, Live, HistoryPage, CommandsByReference, AccountDetails,
         *subscriptions.schemas()],
        ref_template="#/components/schemas/{name}",
    )  # fmt: skip
    components["Problem"] = _PROBLEM
    # msgspec describes the union inline (anyOf with a discriminator mapping on `kind`);
    # name it, so that both request bodies refer to one definition.
    components["PublicCommand"] = command_schema
    command_body = {
        "required": True,
        "content": {"application/json": {"schema": _ref("PublicCommand")}},
    }
    account = {
        "name": "account",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": limits.ACCOUNT_ID_PATTERN},
    }
    paths = _paths(account, command_body)
    _add_read_paths(paths, account)
    paths.update(subscriptions.paths(_SIGNED, _problems, _V1_ERRORS))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tally ingress",
            "version": "1",
            "description": "Signed commands in, balances and results out. Amounts are "
            "JSON integers in minor units from 1 to 2^127-1 (balances: exact integers of "
            "any size); above 2^53 parse them with a big-integer-aware JSON reader, never "
            "into a double (JavaScript: not Number). Requests under /v1 are signed: "
            "HMAC-SHA256 over "
            f"the lines {signing.SCHEME}, METHOD, request target, timestamp, nonce, key id, "
            "the body's SHA-256, Idempotency-Key and Content-Type (empty when absent), "
            f"joined by newlines (headers {signing.KEY_ID}, {signing.TIMESTAMP}, "
            f"{signing.NONCE}, {signing.SIGNATURE}); a signature is accepted once. A "
            "header that changes what a request does may be given once, and a JSON body "
            "names each key once (400 otherwise).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "keyId": {"type": "apiKey", "in": "header", "name": signing.KEY_ID},
                "timestamp": {"type": "apiKey", "in": "header", "name": signing.TIMESTAMP},
                "nonce": {"type": "apiKey", "in": "header", "name": signing.NONCE},
                "signature": {"type": "apiKey", "in": "header", "name": signing.SIGNATURE},
            },
        },
    }


def _paths(account: dict[str, Any], command_body: dict[str, Any]) -> dict[str, Any]:
    return {**_command_paths(command_body), **_balance_paths(account), **_probe_paths()}


def _prefer(description: str) -> dict[str, Any]:
    return {
        "name": "Prefer", "in": "header", "required": False, "description": description,
        "schema": {"type": "string", "pattern": r"^wait=([0-9]|[12][0-9]|30)$"},
    }  # fmt: skip


def _signed(op_id: str, summary: str, parameters: list[dict[str, Any]],
            responses: dict[str, Any], **more: Any) -> dict[str, Any]:  # fmt: skip
    """A /v1 operation: signed, with its parameters and answers."""
    return {"operationId": op_id, "summary": summary, "security": _SIGNED,
            "parameters": parameters, **more, "responses": responses}  # fmt: skip


def _command_paths(command_body: dict[str, Any]) -> dict[str, Any]:
    """Submitting commands, one or a batch, and reading a command's recorded result."""
    idempotency_key = {
        "name": "Idempotency-Key", "in": "header", "required": False,
        "description": "The command_id, if the body has none (both: equal).",
        "schema": {"type": "string", "pattern": limits.COMMAND_ID_PATTERN},
    }  # fmt: skip
    batch_unavailable = {
        "description": "Kafka acknowledged none (a BatchAnswer; retry), or "
        "a dependency is unavailable (a problem; see Retry-After).",
        "content": {
            "application/json": {"schema": _ref("BatchAnswer")},
            "application/problem+json": {"schema": _ref("Problem")},
        },
    }
    command_id = {
        "name": "command_id", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": limits.COMMAND_ID_PATTERN},
    }  # fmt: skip
    by_account = {
        "name": "account", "in": "query", "required": False,
        "schema": {"type": "string", "pattern": limits.ACCOUNT_ID_PATTERN},
    }  # fmt: skip
    return {
        "/v1/commands": {"post": _signed(
            "postCommand", "Submit one command.",
            [idempotency_key, _prefer("wait=N (0-30): wait up to N s for the result.")],
            {"200": _json("Result", "The command's result event (Prefer: wait)."),
             "202": _json("Accepted", "In Kafka (acks=all); the result comes later."),
             **_problems(*_V1_ERRORS, 415, 422)},
            requestBody=command_body,
        )},
        "/v1/commands/batch": {"post": _signed(
            "postBatch", "Submit up to 1,000 commands, answered per item.",
            [_prefer("wait=N (0-30): each item waits up to N s (one deadline) for its "
                     "result; 200 when all came, else 207.")],
            {"200": _json("BatchAnswer", "Prefer: wait; every item's result came."),
             "202": _json("BatchAnswer", "Every command accepted."),
             "207": _json("BatchAnswer", "Some commands not accepted; see items."),
             **_problems(*_V1_ERRORS, 415, 422),
             "503": batch_unavailable},
            requestBody={"required": True,
                         "content": {"application/json": {"schema": _ref("BatchRequest")}}},
        )},
        "/v1/commands/{command_id}": {"get": _signed(
            "getCommand", "The engine's first decision on a command id, once recorded.",
            [command_id, by_account],
            {"200": _json("CommandRecord", "The recorded decision."),
             **_problems(*_V1_ERRORS, 409)},
        )},
    }  # fmt: skip


def _balance_paths(account: dict[str, Any]) -> dict[str, Any]:
    consistency = {
        "name": "consistency", "in": "query", "required": False,
        "schema": {"type": "string", "enum": ["cached", "strong"]},
    }  # fmt: skip
    return {
        "/v1/accounts/{account}/balances": {"get": _signed(
            "getBalances", "An account's balances: from Redis, or the engine (strong).",
            [account, consistency, *_POINT_PARAMETERS],
            {"200": _json("Balances", "Each asset's available, held and seq."),
             **_problems(*_V1_ERRORS)},
        )},
    }  # fmt: skip


def _probe_paths() -> dict[str, Any]:
    """The unsigned routes: probes, metrics and this document."""

    def plain(op_id: str, responses: dict[str, Any]) -> dict[str, Any]:
        return {"get": {"operationId": op_id, "responses": responses}}

    def text(description: str, media: str, schema_type: str) -> dict[str, Any]:
        return {"200": {"description": description,
                        "content": {media: {"schema": {"type": schema_type}}}}}  # fmt: skip

    return {
        "/livez": plain("livez", {"200": _json("Live", "The process answers.")}),
        "/readyz": plain("readyz", {
            "200": _json("Ready", "Kafka, PostgreSQL and Redis reachable."), **_problems(503),
        }),
        "/metrics": plain("metrics", text("Prometheus text exposition.", "text/plain", "string")),
        "/openapi.json": plain(
            "openapi", text("This document.", "application/json", "object")
        ),
    }  # fmt: skip


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name, "in": "query", "required": False, "schema": schema,
        "description": description,
    }  # fmt: skip


_SEQ = {"type": "integer", "minimum": 0, "maximum": limits.SEQ_MAX}
_ASSET = {"type": "string", "pattern": limits.ASSET_PATTERN}
_POINT_PARAMETERS = [
    _query(
        "at",
        {"type": "string"},
        "A past time, RFC 3339 with an offset or epoch milliseconds: the balances as "
        "they were then, from PostgreSQL (with `asset`: that one only).",
    ),
    _query("seq", _SEQ, "With `asset`: that balance right after its entry `seq`."),
    _query("asset", _ASSET, "The one asset of `at` or `seq`."),
]


def _add_read_paths(paths: dict[str, Any], account: dict[str, Any]) -> None:
    """The ledger's reads: history, commands by reference, account details."""
    paths["/v1/commands"]["get"] = {
        "operationId": "getCommandsByReference",
        "summary": "The recorded commands that carry a reference (at most 100).",
        "security": _SIGNED,
        "parameters": [
            {
                "name": "reference",
                "in": "query",
                "required": True,
                "schema": {"type": "string", "pattern": limits.REFERENCE_PATTERN},
            }
        ],
        "responses": {
            "200": _json("CommandsByReference", "The commands, by account and command id."),
            **_problems(*_V1_ERRORS),
        },
    }
    paths["/v1/accounts/{account}"] = {
        "get": {
            "operationId": "getAccount",
            "summary": "Status, assets, overdraft limits and last seqs, from the engine.",
            "security": _SIGNED,
            "parameters": [account],
            "responses": {
                "200": _json("AccountDetails", "The account as the engine holds it."),
                **_problems(*_V1_ERRORS),
            },
        }
    }
    paths["/v1/accounts/{account}/entries"] = {
        "get": {
            "operationId": "getEntries",
            "summary": "One page of a balance's history, oldest first, from PostgreSQL.",
            "security": _SIGNED,
            "parameters": [
                account,
                {"name": "asset", "in": "query", "required": True, "schema": _ASSET},
                _query(
                    "after_seq", _SEQ, "Entries after this seq (the cursor; 0: from the first)."
                ),
                _query("before_seq", {**_SEQ, "minimum": 1}, "Entries before this seq."),
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 1000},
                    "Entries per page (default 100).",
                ),
            ],
            "responses": {
                "200": _json("HistoryPage", "Up to `limit` entries and the next page's link."),
                **_problems(*_V1_ERRORS),
            },
        }
    }
