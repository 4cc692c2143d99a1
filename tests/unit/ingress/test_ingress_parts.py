"""The ingress's pure parts: signatures, body parsing, the rate limiter, Prefer: wait, and
the protocol that answers aiohttp's parser errors (on a loopback socket, no services)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import re
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from hypothesis import given
from hypothesis import strategies as st

from ingress import signing
from ingress.commands import BATCH_MAX, parse_batch, parse_command
from ingress.problems import Problem
from ingress.protocol import (
    HEADER_MAX_BYTES,
    HEADERS_MAX,
    URL_MAX_BYTES,
    ProblemRunner,
    ProblemServer,
)
from ingress.ratelimit import TokenBuckets
from ingress.waiting import WAIT_MAX_S, prefer_wait
from streams.client import account_url
from topics.schema import Deposit, Disburse, PublicCommand

KEYS = {"client-a": b"0123456789abcdef0123"}
NOW = 1_800_000_000.0


def _verify(headers: dict[str, str], method: str = "POST", target: str = "/v1/commands",
            body: bytes = b"{}", now: float = NOW) -> str:  # fmt: skip
    signed = signing.verify(KEYS, headers, method, target, body, max_skew_s=300, now=now)
    assert signed.signature == headers["Tally-Signature"]
    return signed.key_id


def _sign(target: str = "/v1/commands", body: bytes = b"{}", **extra: str) -> dict[str, str]:
    """Headers of a request signed for client-a, the signed Content-Type included."""
    content_type = extra.pop("content_type", "application/json")
    headers = signing.sign("client-a", KEYS["client-a"], "POST", target, body,
                           content_type=content_type, now=NOW, **extra)  # fmt: skip
    return {"Content-Type": content_type, **headers}


def test_signature_is_hmac_sha256_of_the_documented_string() -> None:
    headers = signing.sign("client-a", KEYS["client-a"], "post", "/v1/commands?x=1", b"{}",
                           idempotency_key="pay-1", content_type="application/json",
                           nonce="nonce-123", now=NOW)  # fmt: skip
    message = "\n".join([
        "TALLY-HMAC-SHA256-2", "POST", "/v1/commands?x=1", str(int(NOW)), "nonce-123",
        "client-a", hashlib.sha256(b"{}").hexdigest(), "pay-1", "application/json",
    ])  # fmt: skip
    expected = hmac.new(KEYS["client-a"], message.encode(), hashlib.sha256).hexdigest()
    assert headers == {
        "Tally-Key-Id": "client-a",
        "Tally-Timestamp": str(int(NOW)),
        "Tally-Nonce": "nonce-123",
        "Tally-Signature": expected,
    }
    # Absent headers are empty lines.
    bare = signing.string_to_sign("GET", "/livez", "1", "nonce-123", "k", b"")
    assert bare.endswith(hashlib.sha256(b"").hexdigest().encode() + b"\n\n")


def test_a_correct_signature_names_the_client() -> None:
    assert _verify(_sign()) == "client-a"


def test_every_signature_has_its_own_nonce() -> None:
    first, second = _sign(), _sign()
    assert first["Tally-Nonce"] != second["Tally-Nonce"]
    assert first["Tally-Signature"] != second["Tally-Signature"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"Tally-Key-Id": None}, "Tally-Key-Id"),
        ({"Tally-Timestamp": None}, "Tally-Timestamp"),
        ({"Tally-Nonce": None}, "Tally-Nonce"),
        ({"Tally-Signature": None}, "Tally-Signature"),
        ({"Tally-Key-Id": "bad id!"}, "Tally-Key-Id"),
        ({"Tally-Timestamp": "yesterday"}, "Tally-Timestamp"),
        ({"Tally-Timestamp": str(int(NOW) - 301)}, "Tally-Timestamp"),
        ({"Tally-Timestamp": str(int(NOW) + 301)}, "Tally-Timestamp"),
        ({"Tally-Nonce": "short"}, "Tally-Nonce"),
        ({"Tally-Nonce": "another-nonce"}, "Tally-Signature"),
        ({"Tally-Signature": "ABC"}, "Tally-Signature"),
        ({"Tally-Signature": "0" * 64}, "Tally-Signature"),
        ({"Tally-Key-Id": "client-b"}, "Tally-Signature"),  # unknown id: same answer as wrong
        ({"Idempotency-Key": "pay-2"}, "Tally-Signature"),  # finding 2: added after signing
        ({"Content-Type": "text/plain"}, "Tally-Signature"),
        ({"Content-Type": None}, "Tally-Signature"),
    ],
)
def test_bad_signature_headers_are_named(change: dict[str, str | None], field: str) -> None:
    headers = _sign()
    for name, value in change.items():
        if value is None:
            del headers[name]
        else:
            headers[name] = value
    with pytest.raises(signing.SignatureError) as caught:
        _verify(headers)
    assert caught.value.field == field
    assert KEYS["client-a"].decode() not in str(caught.value)


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [("GET", "/v1/commands", b"{}"), ("POST", "/v1/commands/batch", b"{}"),
     ("POST", "/v1/commands", b"{} "), ("POST", "/v1/commands?a=1", b"{}")],
)  # fmt: skip
def test_signature_covers_method_target_and_body(method: str, target: str, body: bytes) -> None:
    headers = _sign()
    with pytest.raises(signing.SignatureError):
        _verify(headers, method, target, body)


@given(
    key=st.one_of(st.none(), st.text(st.characters(codec="utf-8", exclude_characters="\r\n"),
                                      max_size=20)),
    other=st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20),
)  # fmt: skip
def test_the_idempotency_key_is_covered_whatever_its_value(key: str | None, other: str) -> None:
    """Finding 2 of #13: one signature, three Idempotency-Keys, three commands."""
    headers = _sign(**({"idempotency_key": key} if key is not None else {}))
    if key is not None:
        headers["Idempotency-Key"] = key
    assert _verify(headers) == "client-a"
    if other.strip(" \t") != (key or "").strip(" \t"):
        with pytest.raises(signing.SignatureError):
            _verify({**headers, "Idempotency-Key": other})


def test_header_values_are_signed_as_the_server_reads_them() -> None:
    # aiohttp strips surrounding spaces and decodes bytes as UTF-8 with surrogateescape.
    headers = _sign(content_type=" application/json\t")
    assert _verify({**headers, "Content-Type": "application/json"}) == "client-a"
    latin = signing.sign("client-a", KEYS["client-a"], "POST", "/v1/commands", b"{}",
                         idempotency_key="k\u00e9".encode("latin-1"), now=NOW)  # fmt: skip
    as_read = "k\u00e9".encode("latin-1").decode("utf-8", "surrogateescape")
    assert _verify({**latin, "Idempotency-Key": as_read}) == "client-a"
    with pytest.raises(ValueError):
        signing.sign("a", b"s", "POST", "/", b"", idempotency_key="a\nb")


def test_a_signature_within_the_skew_is_accepted() -> None:
    headers = _sign()
    assert _verify(headers, now=NOW + 299) == "client-a"
    signed = signing.verify(KEYS, headers, "POST", "/v1/commands", b"{}", max_skew_s=300,
                            now=NOW - 299)  # fmt: skip
    assert signed.valid_until_s == int(NOW) + 300


DEPOSIT = b'{"kind":"deposit","command_id":"c1","account":"alice","asset":"USD","amount":5}'


def test_parse_command_takes_the_key_from_the_header_when_the_body_has_none() -> None:
    body = b'{"kind":"deposit","account":"alice","asset":"USD","amount":5}'
    assert parse_command(body, "k-1") == Deposit(
        command_id="k-1", account="alice", asset="USD", amount=5
    )
    assert parse_command(DEPOSIT, "c1").command_id == "c1"


@pytest.mark.parametrize(
    ("body", "key", "status", "field"),
    [
        (b"", None, 400, "body"),
        (b"{", None, 400, "body"),
        (b"\xff\xfe", None, 400, "body"),
        (b"[]", None, 422, "body"),
        (DEPOSIT, "other", 422, "command_id"),
        (DEPOSIT, "bad key!", 400, "Idempotency-Key"),
        (b'{"kind":"deposit","account":"alice","asset":"USD","amount":5}', None, 422,
         "command_id"),
        (b'{"kind":"mint","command_id":"c","account":"a"}', None, 422, "kind"),
        (b'{"kind":"credit","command_id":"c","account":"a"}', None, 422, "kind"),
        (b'{"command_id":"c","account":"a"}', None, 422, "kind"),
        (DEPOSIT.replace(b"5}", b"5.0}"), None, 422, "amount"),
        (DEPOSIT.replace(b"5}", b"0}"), None, 422, "amount"),
        (DEPOSIT.replace(b"5}", b"-5}"), None, 422, "amount"),
        (DEPOSIT.replace(b"5}", b"170141183460469231731687303715884105728}"), None, 422,
         "amount"),
        (b'{"kind":"disburse","command_id":"c","account":"a","asset":"USD","legs":[{"to":"b",'
         b'"amount":1},{"to":"c","amount":170141183460469231731687303715884105728}]}', None, 422,
         "legs[1].amount"),
        (b'{"kind":"configure","command_id":"c","account":"a","asset":"USD",'
         b'"overdraft_limit":170141183460469231731687303715884105728}', None, 422,
         "overdraft_limit"),
        (DEPOSIT.replace(b"5}", b'"5"}'), None, 422, "amount"),
        (DEPOSIT.replace(b"alice", b"al ice"), None, 422, "account"),
        (DEPOSIT.replace(b"USD", b"usd"), None, 422, "asset"),
        (DEPOSIT.replace(b"}", b',"memo":"x"}'), None, 422, "memo"),
        (b'{"kind":"disburse","command_id":"c","account":"a","asset":"USD",'
         b'"legs":[{"to":"b","amount":1},{"to":"c"}]}', None, 422, "legs[1].amount"),
    ],
)  # fmt: skip
def test_parse_command_names_the_field(
    body: bytes, key: str | None, status: int, field: str
) -> None:
    with pytest.raises(Problem) as caught:
        parse_command(body, key)
    assert (caught.value.status, caught.value.field) == (status, field)


def test_parse_batch_answers_each_item() -> None:
    other = DEPOSIT.replace(b'"c1"', b'"c2"')
    items = parse_batch(b'{"commands":[' + DEPOSIT + b',{"kind":"deposit"},' + other + b"]}")
    assert isinstance(items[0], Deposit) and isinstance(items[2], Deposit)
    assert isinstance(items[1], Problem) and items[1].field == "commands[1].command_id"


@pytest.mark.parametrize("fast", [True, False])
def test_batch_items_sharing_account_and_command_id_are_all_refused(fast: bool) -> None:
    """Finding 3 of #13: items sharing one command_id were all answered 202."""
    bob = DEPOSIT.replace(b"alice", b"bob")  # same command_id, another account: another command
    other = DEPOSIT.replace(b'"c1"', b'"c2"')
    broken = b"," + (b'{"kind":"deposit"}' if not fast else other.replace(b'"c2"', b'"c3"'))
    items = parse_batch(b'{"commands":[' + b",".join([DEPOSIT, bob, other, DEPOSIT, DEPOSIT])
                        + broken + b"]}")  # fmt: skip
    refused = {i: item.field for i, item in enumerate(items) if isinstance(item, Problem)}
    assert {i: refused[i] for i in (0, 3, 4)} == {
        0: "commands[0].command_id",
        3: "commands[3].command_id",
        4: "commands[4].command_id",
    }
    assert all(refused_item.status == 422 for refused_item in items if isinstance(refused_item,
               Problem))  # fmt: skip
    assert isinstance(items[1], Deposit) and isinstance(items[2], Deposit)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"kind":"withdraw","kind":"deposit","command_id":"c","account":"a","asset":"USD",'
         b'"amount":5}', "kind"),
        (DEPOSIT.replace(b'"amount":5', b'"amount":5,"amount":500'), "amount"),
        (DEPOSIT.replace(b'"kind"', b'"\\u006bind"').replace(b"}", b',"kind":"deposit"}'), "kind"),
        (b'{"kind":"disburse","command_id":"c","account":"a","asset":"USD",'
         b'"legs":[{"to":"b","amount":1},{"to":"c","to":"d","amount":1}]}', "legs[1].to"),
        (DEPOSIT.replace(b"}", b',"memo":{"x":1,"x":2}}'), "memo.x"),  # invalid anyway: 400 first
    ],
)  # fmt: skip
def test_duplicate_keys_are_refused_naming_the_key(body: bytes, field: str) -> None:
    """Finding 3 of #13: msgspec resolved duplicate keys last-wins."""
    for parse in (lambda: parse_command(body, None), lambda: parse_command(body, "c"),
                  lambda: parse_batch(b'{"commands":[' + body + b"]}")):  # fmt: skip
        with pytest.raises(Problem) as caught:
            parse()
        assert caught.value.status == 400 and caught.value.title == "duplicate key"
        assert caught.value.field in (field, f"commands[0].{field}")
    with pytest.raises(Problem) as caught:
        parse_batch(b'{"commands":[' + DEPOSIT + b'],"commands":[' + DEPOSIT + b"]}")
    assert caught.value.field == "commands"


_KEYS = st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=4)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=12,
)


def _encode(node: object, repeat: list[str]) -> str:
    """JSON text of node, where every object whose path is in `repeat` writes its first
    key twice."""
    import json

    def walk(n: object, path: str) -> str:
        if isinstance(n, dict):
            parts = [f"{json.dumps(k)}:{walk(v, f'{path}.{k}' if path else k)}"
                     for k, v in n.items()]  # fmt: skip
            if path in repeat and parts:
                parts.append(parts[0])
            return "{" + ",".join(parts) + "}"
        if isinstance(n, list):
            return "[" + ",".join(walk(v, f"{path}[{i}]") for i, v in enumerate(n)) + "]"
        return json.dumps(n)

    return walk(node, "")


@given(st.dictionaries(_KEYS, _JSON, min_size=1, max_size=4), st.data())
def test_a_key_repeated_at_any_depth_is_found_and_named(
    node: dict[str, object], data: st.DataObject
) -> None:
    from ingress.commands import check_unique_keys

    check_unique_keys(_encode(node, []).encode())  # no duplicate: no problem
    objects = []

    def collect(n: object, path: str) -> None:
        if isinstance(n, dict) and n:
            objects.append((path, next(iter(n))))
            for k, v in n.items():
                collect(v, f"{path}.{k}" if path else k)
        elif isinstance(n, list):
            for i, v in enumerate(n):
                collect(v, f"{path}[{i}]")

    collect(node, "")
    path, key = data.draw(st.sampled_from(objects))
    with pytest.raises(Problem) as caught:
        check_unique_keys(_encode(node, [path]).encode())
    # The only repeated key is named by its path.
    assert caught.value.status == 400
    assert caught.value.field == (f"{path}.{key}" if path else key)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"[]", "body"),
        (b'{"commands":{}}', "commands"),
        (b'{"commands":[]}', "commands"),
        (b'{"commands":[], "extra":1}', "extra"),
        (b'{"commands":[' + b",".join([DEPOSIT] * (BATCH_MAX + 1)) + b"]}", "commands"),
    ],
)
def test_parse_batch_refuses_a_bad_envelope(body: bytes, field: str) -> None:
    with pytest.raises(Problem) as caught:
        parse_batch(body)
    assert caught.value.field == field


def test_parse_batch_of_disbursements() -> None:
    body = (b'{"commands":[{"kind":"disburse","command_id":"c","account":"a","asset":"USD",'
            b'"legs":[{"to":"b","amount":1}]}]}')  # fmt: skip
    (item,) = parse_batch(body)
    assert isinstance(item, Disburse) and item.legs[0].amount == 1


@given(st.binary(max_size=200))
def test_parse_never_raises_anything_but_a_problem(body: bytes) -> None:
    for parse in (lambda: parse_command(body, None), lambda: parse_batch(body)):
        try:
            parse()
        except Problem as problem:
            assert 400 <= problem.status < 500 and problem.field


def test_token_bucket_grants_the_burst_then_says_when() -> None:
    clock = [0.0]
    buckets = TokenBuckets(rate=10, burst=20, clock=lambda: clock[0])
    assert all(buckets.take("a") == 0 for _ in range(20))
    assert buckets.take("a") == pytest.approx(0.1)
    assert buckets.take("b") == 0  # buckets are per client
    clock[0] = 1.0
    assert buckets.take("a", 10) == 0
    assert buckets.take("a", 5) == pytest.approx(0.5)
    assert TokenBuckets.retry_after(0.1) == "1" and TokenBuckets.retry_after(2.2) == "3"


def test_token_bucket_pruning_keeps_throttled_clients_and_drops_refilled_ones() -> None:
    clock = [0.0]
    buckets = TokenBuckets(rate=1, burst=5, clock=lambda: clock[0])
    buckets.max_clients = 3
    assert buckets.take("idle-1") == 0 and buckets.take("idle-2") == 0  # one token each
    assert buckets.take("busy", 5) == 0  # emptied
    clock[0] = 2.0  # the idle ones are full again by now; busy has 2 of 5
    assert buckets.take("new") == 0  # at the bound: prune
    assert set(buckets._buckets) == {"busy", "new"}
    assert buckets.take("busy", 5) == pytest.approx(3.0)  # still throttled


def test_token_bucket_of_rate_zero_never_limits() -> None:
    buckets = TokenBuckets(rate=0, burst=1)
    assert all(buckets.take("a", 1000) == 0 for _ in range(100))


@pytest.mark.parametrize(
    ("header", "wait"),
    [(None, 0), ("respond-async", 0), ("wait=5", 5), ("respond-async, wait=30", 30),
     ("wait=0", 0), ('wait="7"', 7), ("wait=" + "0" * 5000 + "3", 3)],
)  # fmt: skip
def test_prefer_wait(header: str | None, wait: int) -> None:
    assert prefer_wait(header) == wait


@pytest.mark.parametrize(
    "header",
    [f"wait={WAIT_MAX_S + 1}", "wait=-1", "wait=abc", "wait=", "wait=\u00b2", "wait=" + "9" * 5000],
)
def test_prefer_wait_out_of_range_names_the_header(header: str) -> None:
    with pytest.raises(Problem) as caught:
        prefer_wait(header)
    assert (caught.value.status, caught.value.field) == (400, "Prefer")


def test_prefer_headers_are_one_list_and_wait_is_given_once() -> None:
    assert prefer_wait(["respond-async", "wait=3"]) == 3
    for repeated in (["wait=1", "wait=30"], ["wait=1, wait=1"]):
        with pytest.raises(Problem) as caught:
            prefer_wait(repeated)
        assert (caught.value.status, caught.value.field) == (400, "Prefer")


@pytest.mark.parametrize(
    ("account", "path"),
    [("alice", "/balances/alice"), ("..", "/balances/%2E%2E"), ("a.b:c", "/balances/a%2Eb%3Ac")],
)
def test_forwarded_balance_urls_keep_the_account_as_one_segment(account: str, path: str) -> None:
    url = account_url("http://127.0.0.1:6066", account)
    assert url.raw_path == path and url.query["forwarded"] == "1"


# --- JSON-shaped inputs -------------------------------------------------------------
#
# Random bytes almost never parse as JSON, so they only reach the "malformed JSON" path.
# These generate JSON values, and command-shaped objects built from the schema itself
# (`topics.schema`, read through msgspec.inspect): every kind, each field valid, of a
# wrong type, or absent, and now and then a field the schema does not have.

_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # past int64 and uint64 both
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_KINDS = msgspec.inspect.type_info(PublicCommand)
assert isinstance(_KINDS, msgspec.inspect.UnionType)


def _valid(t: msgspec.inspect.Type) -> st.SearchStrategy[Any]:
    """Values the schema's type `t` accepts, drawn from the type's own constraints."""
    if isinstance(t, msgspec.inspect.Metadata):
        return _valid(t.type)
    if isinstance(t, msgspec.inspect.StrType):
        return st.from_regex(t.pattern) if t.pattern else st.text(max_size=12)
    if isinstance(t, msgspec.inspect.IntType):
        return st.integers(min_value=t.ge, max_value=t.le)
    if isinstance(t, msgspec.inspect.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, msgspec.inspect.NoneType):
        return st.none()
    if isinstance(t, msgspec.inspect.UnionType):
        return st.one_of([_valid(u) for u in t.types])
    if isinstance(t, msgspec.inspect.ListType):
        return st.lists(_valid(t.item_type), min_size=t.min_length or 0, max_size=3)
    if isinstance(t, msgspec.inspect.DictType):
        # Short values: three keys stay far within limits.METADATA_BYTES_MAX.
        values = _valid(t.value_type).map(lambda v: v[:40])
        return st.dictionaries(_valid(t.key_type), values, max_size=min(t.max_length or 3, 3))
    if isinstance(t, msgspec.inspect.StructType):
        return st.fixed_dictionaries(
            {f.name: _valid(f.type) for f in t.fields if f.required},
            optional={f.name: _valid(f.type) for f in t.fields if not f.required},
        )
    raise AssertionError(f"no generator for {t!r}: extend _valid")


def _near_miss(value: Any) -> st.SearchStrategy[Any]:
    """`value` as another JSON type that a lax parser would take for it: "5" or 5.0 for
    5, true for 1, [x] or {"value": x} for x."""
    options: list[Any] = [json.dumps(value), [value], {"value": value}]
    if value is None:
        # "null" is no near miss of an absent optional string: it is a valid id, or
        # reference, of its own.
        options = options[1:]
    if isinstance(value, int) and not isinstance(value, bool):
        options += [str(value), float(value), value == 1]
    return st.sampled_from(options)


def _valid_command(t: msgspec.inspect.StructType) -> st.SearchStrategy[dict[str, Any]]:
    assert t.tag_field is not None
    return _valid(t).map(lambda fields: {t.tag_field: t.tag, **fields})


@st.composite
def _command_shaped(draw: st.DrawFn, t: msgspec.inspect.StructType) -> dict[str, Any]:
    """A valid command of kind `t` broken in up to two places (the kind included): a
    field dropped, given as a near miss of its type, or as any JSON value; and now and
    then a field the schema does not have."""
    obj: dict[str, Any] = draw(_valid_command(t))
    names = sorted({*obj, *(f.name for f in t.fields)})
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(names))
        how = draw(st.sampled_from(["drop", "near miss", "any"]))
        if how == "drop":
            obj.pop(name, None)
        elif how == "near miss" and name in obj:
            obj[name] = draw(_near_miss(obj[name]))
        else:
            obj[name] = draw(_JSON)
    if draw(st.integers(0, 3)) == 0:
        obj[draw(st.text(max_size=8))] = draw(_JSON)
    return obj


@st.composite
def _one_near_miss(
    draw: st.DrawFn, t: msgspec.inspect.StructType
) -> tuple[dict[str, Any], str, str]:
    """A valid command of kind `t` with one of its fields given as a near miss; the
    field's name, and the command's own id."""
    obj: dict[str, Any] = draw(_valid_command(t))
    command_id = obj["command_id"]
    name = draw(st.sampled_from(sorted(k for k in obj if k != t.tag_field)))
    obj[name] = draw(_near_miss(obj[name]))
    return obj, name, command_id


VALID_COMMANDS = st.one_of([_valid_command(t) for t in _KINDS.types])
COMMAND_SHAPED = st.one_of([_command_shaped(t) for t in _KINDS.types])
ONE_NEAR_MISS = st.one_of([_one_near_miss(t) for t in _KINDS.types])


def _wire(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _as_given(command: Any, obj: dict[str, Any]) -> None:
    """A command parsed from `obj` carries exactly what `obj` said, type for type (an
    accepted "5" for 5, or true for 1, would differ on the wire)."""
    for key, value in obj.items():
        if key != "kind":
            assert _wire(msgspec.to_builtins(getattr(command, key))) == _wire(value), key


def _names_its_field(problem: Problem, obj: dict[str, Any], prefix: str = "") -> None:
    """A refusal is a 4xx that names the body, the kind, a field the object has, or a
    field its kind requires."""
    assert 400 <= problem.status < 500 and problem.field, problem
    field = problem.field.removeprefix(prefix)
    if prefix and field == prefix.rstrip("."):
        field = "body"  # the item as a whole (an unknown field named "", say)
    root = re.split(r"[.\[]", field, maxsplit=1)[0]
    kind = next((t for t in _KINDS.types if t.tag == obj.get("kind")), None)
    required = {f.name for f in kind.fields if f.required} if kind is not None else set()
    named = {"body", "kind"} | set(obj) | required
    # A key may itself hold "." or "[": then the field is that key whole.
    assert field in named or root in named, (problem.field, obj)


@given(VALID_COMMANDS)
def test_every_command_the_schema_allows_is_accepted_as_given(obj: dict[str, Any]) -> None:
    body = _wire(obj).encode()
    command = parse_command(body, None)
    _as_given(command, obj)
    (item,) = parse_batch(_wire({"commands": [obj]}).encode())
    assert item == command


@given(COMMAND_SHAPED, st.sampled_from([None, "k-1"]))
def test_command_shaped_json_is_a_command_as_given_or_a_problem_naming_its_field(
    obj: dict[str, Any], key: str | None
) -> None:
    try:
        command = parse_command(_wire(obj).encode(), key)
    except Problem as problem:
        _names_its_field(problem, obj)
        return
    if key is not None and "command_id" not in obj:
        obj = {**obj, "command_id": key}
    _as_given(command, obj)


@given(ONE_NEAR_MISS, st.booleans())
def test_a_near_miss_of_a_field_s_type_is_refused_naming_that_field(
    case: tuple[dict[str, Any], str, str], with_key: bool
) -> None:
    # No coercion: "5", 5.0 or true is not the amount 5, ["a"] is not the account "a".
    # (With the Idempotency-Key header, the same id: the parse takes another path.)
    obj, name, command_id = case
    with pytest.raises(Problem) as caught:
        parse_command(_wire(obj).encode(), command_id if with_key else None)
    assert caught.value.status == 422, caught.value
    assert re.split(r"[.\[]", caught.value.field, maxsplit=1)[0] == name, (caught.value, obj)


@given(st.lists(COMMAND_SHAPED, min_size=1, max_size=4))
def test_a_batch_of_command_shaped_json_answers_each_item_in_its_place(
    objs: list[dict[str, Any]],
) -> None:
    items = parse_batch(_wire({"commands": objs}).encode())
    assert len(items) == len(objs)
    for i, (item, obj) in enumerate(zip(items, objs, strict=True)):
        if isinstance(item, Problem):
            assert item.field.startswith(f"commands[{i}]"), (item.field, i)
            _names_its_field(item, obj, prefix=f"commands[{i}].")
        else:
            _as_given(item, obj)


@given(_JSON)
def test_any_json_value_is_a_command_or_a_problem(value: Any) -> None:
    body = _wire(value).encode()
    for parse in (lambda: parse_command(body, None), lambda: parse_batch(body)):
        try:
            parse()
        except Problem as problem:
            assert 400 <= problem.status < 500 and problem.field, problem


def test_an_unknown_field_holding_a_backtick_is_named_whole() -> None:
    # Found by the command-shaped generator: the name was cut at its first backtick.
    body = DEPOSIT.replace(b"}", b',"0`x":1}')
    with pytest.raises(Problem) as caught:
        parse_command(body, None)
    assert (caught.value.field, caught.value.title) == ("0`x", "unknown field")
    (item,) = parse_batch(b'{"commands":[' + body + b"]}")
    assert isinstance(item, Problem) and item.field == "commands[0].0`x"


# --- what aiohttp's parser refuses (ingress.protocol), pinned against aiohttp ---------

PARSER_CASES = [
    (b"HELLO\r\n\r\n", 400, "request line"),
    (b"GET /" + b"a" * (URL_MAX_BYTES + 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "url"),
    (b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * (HEADER_MAX_BYTES + 10) + b"\r\n\r\n",
     431, "headers"),
    (b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(HEADERS_MAX))
     + b"\r\n", 431, "headers"),
    (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Type: a/b\r\nContent-Type: c/d\r\n"
     b"Content-Length: 0\r\n\r\n", 400, "Content-Type"),
    (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "body"),
]  # fmt: skip


async def test_problem_runner_answers_parser_errors_as_problems() -> None:
    """Fails if aiohttp moves what ingress.protocol relies on: AppRunner._make_server,
    Server._kwargs, RequestHandler.handle_error's signature, the parser's exceptions."""
    params = list(inspect.signature(RequestHandler.handle_error).parameters)
    assert params == ["self", "request", "status", "exc", "message"]

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/x", ok)
    app.router.add_post("/x", ok)
    counted: list[int] = []
    runner = ProblemRunner(app, on_error=counted.append, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        assert isinstance(runner.server, ProblemServer)
        port = runner.addresses[0][1]
        for data, status, field in PARSER_CASES:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == str(status).encode(), (data[:40], answer[:200])
            assert b"Content-Type: application/problem+json" in head
            problem = msgspec.json.decode(body)
            assert (problem["status"], problem["field"]) == (status, field), problem
        assert counted == [status for _, status, _ in PARSER_CASES]
        # A good request still gets its handler.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 10)).endswith(b"\r\n\r\nok")
        writer.close()
    finally:
        await runner.cleanup()


async def test_chunked_framing_broken_mid_body_reaches_the_reading_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The headers and the start of the body first, the broken chunk later: the handler
    reading the body gets the parser's error at once (not after its deadline)."""
    from aiohttp.http_exceptions import HttpProcessingError

    async def read(request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(request.read(), 20)
        except HttpProcessingError:
            return web.Response(text="framing")
        return web.Response(text="read")

    app = web.Application()
    app.router.add_post("/x", read)
    runner = ProblemRunner(app, on_error=lambda status: None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"zz\r\n{}\r\n0\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        # The handler's answer first (then aiohttp's own for the broken framing, as this
        # handler keeps the connection open; the ingress's 400 closes it).
        assert answer.startswith(b"HTTP/1.1 200") and b"\r\n\r\nframing" in answer, answer
    finally:
        await runner.cleanup()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_client_that_sends_its_headers_slowly_is_closed_at_the_keepalive() -> None:
    """Slow headers never reach a handler: aiohttp's keep-alive timer is their bound
    (ingress.protocol sets it; this pins that aiohttp applies it to a partial request)."""
    app = web.Application()
    runner = ProblemRunner(app, on_error=lambda status: None, keepalive_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing answered
        writer.close()
    finally:
        await runner.cleanup()


# --- the replay check's batching (ingress.replay), against a stand-in for Redis -------


class _FakeRedis:
    """SET NX semantics in a dict; every round trip takes a loop turn or two, and counts."""

    def __init__(self, fail: bool = False) -> None:
        self.keys: dict[str, int] = {}
        self.trips: list[int] = []  # commands per round trip
        self.in_flight = self.in_flight_max = 0
        self.fail = fail

    async def _trip(self, commands: list[tuple[str, int]]) -> list[bool | None]:
        self.in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            if self.fail:
                raise ConnectionError("refused")
            self.trips.append(len(commands))
            return [None if k in self.keys else bool(self.keys.setdefault(k, ttl))
                    for k, ttl in commands]  # fmt: skip
        finally:
            self.in_flight -= 1

    async def set(self, key: str, value: bytes, *, nx: bool, ex: int) -> bool | None:
        assert nx and value == b"1"
        return (await self._trip([(key, ex)]))[0]

    def pipeline(self, *, transaction: bool) -> _FakePipeline:
        return _FakePipeline(self)


class _FakePipeline:
    def __init__(self, redis: _FakeRedis) -> None:
        self.redis = redis
        self.commands: list[tuple[str, int]] = []

    async def __aenter__(self) -> _FakePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def set(self, key: str, value: bytes, *, nx: bool, ex: int) -> None:
        self.commands.append((key, ex))

    async def execute(self) -> list[bool | None]:
        return await self.redis._trip(self.commands)


async def test_claims_are_batched_with_at_most_two_round_trips_at_a_time() -> None:
    from ingress.replay import SeenSignatures, seen_key

    redis = _FakeRedis()
    seen = SeenSignatures(redis, "p")
    signatures = [f"{i:032x}" + "f" * 32 for i in range(200)]
    firsts = await asyncio.gather(*(seen.claim("k", sig, 30) for sig in signatures))
    again = await asyncio.gather(*(seen.claim("k", sig, 30) for sig in signatures[:50]))
    assert all(firsts) and not any(again)
    assert redis.in_flight_max <= SeenSignatures.in_flight_max
    assert sum(redis.trips) == 250 and len(redis.trips) < 20  # batched, not one per claim
    assert redis.keys[seen_key("p", "k", signatures[0])] == 30
    assert seen_key("p", "k", signatures[0]) == f"p:seen:k:{signatures[0][:32]}"
    assert await seen.claim("other-key", signatures[0], 30)  # per key id


async def test_a_claim_redis_cannot_answer_is_unknown_not_granted() -> None:
    from ingress.replay import ReplayUnknown, SeenSignatures

    seen = SeenSignatures(_FakeRedis(fail=True), "p")
    results = await asyncio.gather(*(seen.claim("k", f"{i:064x}", 30) for i in range(5)),
                                   return_exceptions=True)  # fmt: skip
    assert all(isinstance(r, ReplayUnknown) for r in results), results


def test_tally_sign_prints_headers_the_server_accepts() -> None:
    """The README's curl recipe: `curl -H @<(tally sign ...)` sends these lines as is."""
    from click.testing import CliRunner
    from multidict import CIMultiDict

    from tally.cli import main

    body = DEPOSIT.decode()
    env = {"TALLY_CLIENT_KEY_ID": "client-a", "TALLY_CLIENT_SECRET": KEYS["client-a"].decode()}
    out = CliRunner().invoke(main, ["sign", "POST", "/v1/commands", body, "--idempotency-key",
                                    "c1"], env=env)  # fmt: skip
    assert out.exit_code == 0, out.output
    headers = CIMultiDict(line.split(": ", 1) for line in out.output.splitlines())
    assert headers["Content-Type"] == "application/json" and headers["Idempotency-Key"] == "c1"
    signed = signing.verify(KEYS, headers, "POST", "/v1/commands", DEPOSIT, max_skew_s=300)
    assert signed.key_id == "client-a"
    again = CliRunner().invoke(main, ["sign", "GET", "/v1/accounts/alice/balances"], env=env)
    lines = dict(line.split(": ", 1) for line in again.output.splitlines())
    assert "Content-Type" not in lines and lines["Tally-Nonce"] != headers["Tally-Nonce"]
    assert signing.verify(KEYS, lines, "GET", "/v1/accounts/alice/balances", b"",
                          max_skew_s=300).key_id == "client-a"  # fmt: skip
