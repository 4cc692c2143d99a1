"""The ingress's pure parts: signatures, body parsing, the rate limiter, Prefer: wait."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingress import signing
from ingress.app import WAIT_MAX_S, prefer_wait
from ingress.commands import BATCH_MAX, parse_batch, parse_command
from ingress.problems import Problem
from ingress.ratelimit import TokenBuckets
from streams.web import account_url
from topics.schema import Deposit, Disburse, PublicCommand

KEYS = {"client-a": b"0123456789abcdef0123"}
NOW = 1_800_000_000.0


def _verify(headers: dict[str, str], method: str = "POST", target: str = "/v1/commands",
            body: bytes = b"{}", now: float = NOW) -> str:  # fmt: skip
    return signing.verify(KEYS, headers, method, target, body, max_skew_s=300, now=now)


def test_signature_is_hmac_sha256_of_the_documented_string() -> None:
    headers = signing.sign("client-a", KEYS["client-a"], "post", "/v1/commands?x=1", b"{}", now=NOW)
    message = f"POST\n/v1/commands?x=1\n{int(NOW)}\n{hashlib.sha256(b'{}').hexdigest()}"
    expected = hmac.new(KEYS["client-a"], message.encode(), hashlib.sha256).hexdigest()
    assert headers == {
        "Tally-Key-Id": "client-a",
        "Tally-Timestamp": str(int(NOW)),
        "Tally-Signature": expected,
    }


def test_a_correct_signature_names_the_client() -> None:
    headers = signing.sign("client-a", KEYS["client-a"], "POST", "/v1/commands", b"{}", now=NOW)
    assert _verify(headers) == "client-a"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"Tally-Key-Id": None}, "Tally-Key-Id"),
        ({"Tally-Timestamp": None}, "Tally-Timestamp"),
        ({"Tally-Signature": None}, "Tally-Signature"),
        ({"Tally-Key-Id": "bad id!"}, "Tally-Key-Id"),
        ({"Tally-Timestamp": "yesterday"}, "Tally-Timestamp"),
        ({"Tally-Timestamp": str(int(NOW) - 301)}, "Tally-Timestamp"),
        ({"Tally-Timestamp": str(int(NOW) + 301)}, "Tally-Timestamp"),
        ({"Tally-Signature": "ABC"}, "Tally-Signature"),
        ({"Tally-Signature": "0" * 64}, "Tally-Signature"),
        ({"Tally-Key-Id": "client-b"}, "Tally-Signature"),  # unknown id: same answer as wrong
    ],
)
def test_bad_signature_headers_are_named(change: dict[str, str | None], field: str) -> None:
    headers = signing.sign("client-a", KEYS["client-a"], "POST", "/v1/commands", b"{}", now=NOW)
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
    headers = signing.sign("client-a", KEYS["client-a"], "POST", "/v1/commands", b"{}", now=NOW)
    with pytest.raises(signing.SignatureError):
        _verify(headers, method, target, body)


def test_a_signature_within_the_skew_is_accepted() -> None:
    headers = signing.sign("client-a", KEYS["client-a"], "POST", "/v1/commands", b"{}", now=NOW)
    assert _verify(headers, now=NOW + 299) == "client-a"


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
        (DEPOSIT.replace(b"5}", b"9223372036854775808}"), None, 422, "amount"),
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
    items = parse_batch(b'{"commands":[' + DEPOSIT + b',{"kind":"deposit"},' + DEPOSIT + b"]}")
    assert isinstance(items[0], Deposit) and isinstance(items[2], Deposit)
    assert isinstance(items[1], Problem) and items[1].field == "commands[1].command_id"


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
