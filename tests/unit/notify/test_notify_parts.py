"""The pure parts of deliveries (#17): URL checks, filters, delivery ids, signatures,
backoff, the progress watermark, and the lanes' group commit."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from notify import rules
from notify.deliver import Progress
from notify.lanes import LaneLog
from notify.resolver import PublicOnly
from topics import limits
from topics.schema import PUBLIC_KINDS


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/tally",
        "https://hooks.example.com:8443/a?b=c",
        "https://93.184.216.34/x",
    ],
)
def test_public_https_targets_are_accepted_in_production(url: str) -> None:
    assert rules.check_url(url, allow_private=False) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com/x",  # http
        "https://127.0.0.1/x",
        "https://localhost/x",
        "https://api.localhost/x",
        "https://10.1.2.3/x",
        "https://192.168.0.1/x",
        "https://172.16.0.1/x",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/x",
        "https://[::ffff:127.0.0.1]/x",
        "https://[fd00::1]/x",
        "https://0.0.0.0/x",
        "https://2130706433/x",  # 127.0.0.1 as one number
        "https://0x7f.1/x",
    ],
)
def test_private_or_plain_targets_are_refused_in_production(url: str) -> None:
    with pytest.raises(rules.InvalidSubscription) as caught:
        rules.check_url(url, allow_private=False)
    assert caught.value.field == "url"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/x",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "http://user:pw@127.0.0.1/x",
        "http://user@127.0.0.1/x",
        "http:///x",
        "http://127.0.0.1:0/x",
        "http://127.0.0.1:99999/x",
        "http://127.0.0.1/x#frag",
        "http://127.0.0.1/a b",
        "http://127.0.0.1/\r\nX: y",
        "http://bücher.example/x",
        "",
        "http://127.0.0.1/" + "a" * rules.URL_LEN_MAX,
    ],
)
def test_malformed_targets_are_refused_even_when_private_is_allowed(url: str) -> None:
    with pytest.raises(rules.InvalidSubscription):
        rules.check_url(url, allow_private=True)


def test_loopback_http_is_accepted_when_allowed() -> None:
    assert rules.check_url("http://127.0.0.1:8080/hook", allow_private=True)


@given(st.text(max_size=300))
def test_check_url_answers_every_string_with_a_url_or_a_field(text: str) -> None:
    try:
        rules.check_url(text, allow_private=False)
    except rules.InvalidSubscription as exc:
        assert exc.field == "url"


def test_filters_match_by_account_prefix_status_and_kind() -> None:
    everything = rules.Filter()
    assert everything.matches("anyone", "applied", "deposit")
    f = rules.Filter(accounts=["alice"], account_prefixes=["shop:"], statuses=["rejected"],
                     kinds=["withdraw", "transfer"])  # fmt: skip
    assert f.matches("alice", "rejected", "withdraw")
    assert f.matches("shop:42", "rejected", "transfer")
    assert not f.matches("alicex", "rejected", "withdraw")  # accounts are exact
    assert not f.matches("bob", "rejected", "withdraw")
    assert not f.matches("alice", "applied", "withdraw")
    assert not f.matches("alice", "rejected", "deposit")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (rules.Filter(accounts=["a b"]), "filter.accounts[0]"),
        (rules.Filter(account_prefixes=["ok", ""]), "filter.account_prefixes[1]"),
        (rules.Filter(statuses=["applied", "won"]), "filter.statuses[1]"),
        (rules.Filter(kinds=["steal"]), "filter.kinds[0]"),
        (rules.Filter(accounts=["a"] * (rules.FILTER_ITEMS_MAX + 1)), "filter.accounts"),
    ],
)
def test_bad_filters_name_the_item(raw: rules.Filter, field: str) -> None:
    with pytest.raises(rules.InvalidSubscription) as caught:
        rules.check_filter(raw, account_pattern=limits.ACCOUNT_ID_PATTERN, kinds=PUBLIC_KINDS)
    assert caught.value.field == field


def test_delivery_ids_are_stable_and_distinct() -> None:
    one = rules.delivery_id("sub_a", "t.events", 1, 7)
    assert one == rules.delivery_id("sub_a", "t.events", 1, 7)
    others = {
        rules.delivery_id("sub_b", "t.events", 1, 7),
        rules.delivery_id("sub_a", "u.events", 1, 7),
        rules.delivery_id("sub_a", "t.events", 2, 7),
        rules.delivery_id("sub_a", "t.events", 1, 8),
        rules.delivery_id("sub_a", "t.events", 17, 0),  # "1\n7" vs "17\n0": no clash
    }
    assert one not in others and len(others) == 5


def test_the_signature_is_hmac_sha256_of_the_documented_lines() -> None:
    secret, body = b"s" * 20, b'{"x":1}'
    sig = rules.signature(secret, 1700000000, "d1", "sub_a", body)
    text = "\n".join(
        ["TALLY-DELIVERY-HMAC-SHA256-1", "1700000000", "d1", "sub_a",
         hashlib.sha256(body).hexdigest()]
    ).encode()  # fmt: skip
    assert sig == hmac.new(secret, text, hashlib.sha256).hexdigest()
    headers = {rules.TIMESTAMP: "1700000000", rules.DELIVERY_ID: "d1",
               rules.SUBSCRIPTION_ID: "sub_a", rules.SIGNATURE: sig}  # fmt: skip
    assert rules.verify(secret, headers, body, now_s=1700000010)
    assert not rules.verify(secret, headers, body + b" ", now_s=1700000010)
    assert not rules.verify(b"t" * 20, headers, body, now_s=1700000010)
    assert not rules.verify(secret, headers, body, now_s=1700009999)  # stale
    assert not rules.verify(secret, {**headers, rules.DELIVERY_ID: "d2"}, body, now_s=1700000010)


def test_backoff_is_full_jitter_under_a_doubling_ceiling() -> None:
    rng = random.Random(7)
    for attempt in range(1, 80):
        ceiling = min(5.0, 0.1 * 2 ** (attempt - 1))
        waits = [rules.backoff_s(attempt, first_s=0.1, max_s=5.0, rng=rng) for _ in range(50)]
        assert all(0 <= w <= ceiling for w in waits)
    late = [rules.backoff_s(30, first_s=0.1, max_s=5.0, rng=rng) for _ in range(200)]
    assert max(late) > 2.5  # spread over the whole range, not stuck at the first step


def test_the_watermark_stops_at_the_first_delivery_not_done() -> None:
    progress = Progress({0: 10, 1: 0})
    progress.read(0, 10, pending=True)
    progress.read(0, 11, pending=False)  # not matching: done at once
    progress.read(0, 12, pending=True)
    assert progress.watermarks() == {0: 10, 1: 0}
    progress.finish(0, 12)
    assert progress.watermarks()[0] == 10  # 10 is still in flight
    progress.finish(0, 10)
    assert progress.watermarks()[0] == 13
    progress.stored.update(progress.watermarks())
    assert progress.changed() == {}


@pytest.mark.parametrize(
    ("address", "public"),
    [("93.184.216.34", True), ("2606:2800:220:1::1", True), ("127.0.0.1", False),
     ("10.0.0.1", False), ("::1", False), ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False),
     ("not-an-address", False)],
)  # fmt: skip
def test_resolved_addresses_are_checked_again_at_connect_time(address: str, public: bool) -> None:
    assert rules.global_address(address) is public


async def test_a_name_resolving_to_loopback_is_not_connected_to() -> None:
    resolver = PublicOnly()
    try:
        with pytest.raises(OSError, match="no public address"):
            await resolver.resolve("localhost", 443)
    finally:
        await resolver.close()


# The lanes' group commit (notify.lanes) -------------------------------------------------


class _Saves:
    """A save that records each batch, fails the first `failures` calls, and can be held."""

    def __init__(self, failures: int = 0) -> None:
        self.batches: list[dict[tuple[str, int, int], int]] = []
        self.failures = failures
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, batch: dict[tuple[str, int, int], int]) -> None:
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise OSError("PostgreSQL away")
        self.batches.append(dict(batch))


async def test_lanes_finishing_during_a_write_go_together_in_the_next() -> None:
    saves = _Saves()
    log = LaneLog(saves)
    writer = asyncio.create_task(log.run())
    try:
        saves.gate.clear()  # the first write is under way while the others finish
        first = asyncio.create_task(log.done(("s", 0, 0), 5))
        await asyncio.sleep(0.01)
        rest = [asyncio.create_task(log.done(("s", p, lane), 7)) for p, lane in ((0, 1), (1, 2))]
        rest.append(asyncio.create_task(log.done(("t", 0, 0), 9)))
        await asyncio.sleep(0.01)
        assert not first.done()  # a lane goes on only once its offset is stored
        saves.gate.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), 2)
        assert saves.batches == [
            {("s", 0, 0): 5},
            {("s", 0, 1): 7, ("s", 1, 2): 7, ("t", 0, 0): 9},
        ]
    finally:
        writer.cancel()


async def test_a_failed_write_is_retried_and_the_lane_waits_for_it() -> None:
    saves = _Saves(failures=2)
    log = LaneLog(saves)
    writer = asyncio.create_task(log.run())
    try:
        await asyncio.wait_for(log.done(("s", 3, 1), 42), 5)
        assert saves.batches == [{("s", 3, 1): 42}]
    finally:
        writer.cancel()


async def test_a_write_cut_by_the_shutdown_is_flushed_after_it() -> None:
    saves = _Saves()
    log = LaneLog(saves)
    writer = asyncio.create_task(log.run())
    saves.gate.clear()
    lane = asyncio.create_task(log.done(("s", 0, 2), 11))
    await asyncio.sleep(0.01)
    for task in (lane, writer):  # the reader stops, then the writer
        task.cancel()
    await asyncio.gather(lane, writer, return_exceptions=True)
    saves.gate.set()
    await log.flush()
    assert saves.batches == [{("s", 0, 2): 11}]
