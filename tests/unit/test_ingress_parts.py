"""The ingress's pure parts: signatures, body parsing, the rate limiter, Prefer: wait."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingress import signing
from ingress.app import WAIT_MAX_S, prefer_wait
from ingress.commands import BATCH_MAX, parse_batch, parse_command
from ingress.problems import Problem
from ingress.ratelimit import TokenBuckets
from streams.web import account_url
from topics.schema import Deposit, Disburse

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
