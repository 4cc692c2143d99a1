"""The pure rules of deliveries: target URL checks, filters, delivery ids, signatures and
the retry backoff. No I/O; the ingress (subscriptions API) and the notifier share them.

A delivery is a POST of the JSON body

    {"delivery_id": ..., "subscription_id": ..., "topic": ..., "partition": ...,
     "offset": ..., "command_id": ..., "event": {the result event as on the topic}}

with these headers:

    Content-Type:          application/json
    Tally-Delivery-Id:     the delivery id (the same on every retry and redelivery)
    Tally-Subscription-Id: the subscription
    Tally-Command-Id:      the event's command_id
    Tally-Timestamp:       Unix time in whole seconds when this attempt was signed
    Tally-Signature:       hex HMAC-SHA256(subscription secret, string_to_sign)

and the string to sign is these five lines joined by "\\n" (no "\\n" after the last):

    TALLY-DELIVERY-HMAC-SHA256-1   the scheme and its version, this exact text
    timestamp                      the Tally-Timestamp value
    delivery id                    the Tally-Delivery-Id value
    subscription id                the Tally-Subscription-Id value
    hex SHA-256 of the body        64 lower-case digits

A receiver recomputes it, compares in constant time, refuses timestamps far from its
clock, and deduplicates by delivery id: delivery_id = hex of the first 16 bytes of
SHA-256("<subscription id>\\n<topic>\\n<partition>\\n<offset>"), so a redelivery of the
same event to the same subscription has the same id.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
import re
import zlib
from collections.abc import Sequence
from urllib.parse import urlsplit

import msgspec

SCHEME = "TALLY-DELIVERY-HMAC-SHA256-1"
DELIVERY_ID = "Tally-Delivery-Id"
SUBSCRIPTION_ID = "Tally-Subscription-Id"
COMMAND_ID = "Tally-Command-Id"
TIMESTAMP = "Tally-Timestamp"
SIGNATURE = "Tally-Signature"

URL_LEN_MAX = 2048
FILTER_ITEMS_MAX = 100  # per list of a filter: a filter is checked for every event
STATUSES = ("applied", "rejected", "duplicate")


class InvalidSubscription(ValueError):
    """Subscription input that cannot be accepted; `field` names it (a JSON path)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


def check_url(url: str, *, allow_private: bool) -> str:
    """The target URL, or InvalidSubscription: http(s) with a host, no credentials, no
    fragment; unless `allow_private`, https only and no loopback, private, link-local or
    otherwise non-global address given literally (nor a `localhost` name)."""
    if not isinstance(url, str) or not url or len(url) > URL_LEN_MAX:
        raise InvalidSubscription("url", f"a URL of 1-{URL_LEN_MAX} characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url) or not url.isascii():
        raise InvalidSubscription("url", "no spaces, control or non-ASCII characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidSubscription("url", f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidSubscription("url", "the scheme is http or https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidSubscription("url", "no credentials in the URL (sign with the secret)")
    host = parts.hostname or ""
    if not host:
        raise InvalidSubscription("url", "the URL names no host")
    if parts.fragment or url.endswith("#"):
        raise InvalidSubscription("url", "no fragment")
    if port == 0:
        raise InvalidSubscription("url", "port 0")
    if allow_private:
        return url
    if parts.scheme != "https":
        raise InvalidSubscription("url", "https only (TALLY_NOTIFY_ALLOW_PRIVATE allows http)")
    if not public_host(host):
        raise InvalidSubscription(
            "url", "loopback and private addresses are refused (TALLY_NOTIFY_ALLOW_PRIVATE)"
        )
    return url


def public_host(host: str) -> bool:
    """Whether a host (name or literal address) may be a target in production."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith((".localhost", ".local", ".internal")):
        return False
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        # Decimal or hex forms some resolvers accept ("2130706433", "0x7f.1") are refused.
        return not all(part.isdigit() or part.startswith("0x") for part in name.split("."))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global


class Filter(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which result events a subscription gets. An empty list matches everything; an
    event matches when its account is listed or starts with a listed prefix (when either
    list is given), its status is listed and its kind is listed."""

    accounts: list[str] = []
    account_prefixes: list[str] = []
    statuses: list[str] = []
    kinds: list[str] = []

    def matches(self, account: str, status: str, kind: str) -> bool:
        listed = account in self.accounts or account.startswith(tuple(self.account_prefixes))
        if (self.accounts or self.account_prefixes) and not listed:
            return False
        if self.statuses and status not in self.statuses:
            return False
        return not (self.kinds and kind not in self.kinds)


def check_filter(raw: Filter, *, account_pattern: str, kinds: Sequence[str]) -> Filter:
    """The filter, or InvalidSubscription naming the item at fault."""
    account = re.compile(account_pattern)
    lists = {
        "accounts": raw.accounts,
        "account_prefixes": raw.account_prefixes,
        "statuses": raw.statuses,
        "kinds": raw.kinds,
    }
    for name, items in lists.items():
        if len(items) > FILTER_ITEMS_MAX:
            raise InvalidSubscription(f"filter.{name}", f"at most {FILTER_ITEMS_MAX} items")
        for i, item in enumerate(items):
            where = f"filter.{name}[{i}]"
            if name == "accounts" and not account.match(item):
                raise InvalidSubscription(where, "an account id (1-64 of A-Z a-z 0-9 _ . : -)")
            if name == "account_prefixes" and not (1 <= len(item) <= 64 and account.match(item)):
                raise InvalidSubscription(where, "a prefix of 1-64 of A-Z a-z 0-9 _ . : -")
            if name == "statuses" and item not in STATUSES:
                raise InvalidSubscription(where, f"one of {', '.join(STATUSES)}")
            if name == "kinds" and item not in kinds:
                raise InvalidSubscription(where, f"one of {', '.join(kinds)}")
    return raw


def delivery_id(subscription_id: str, topic: str, partition: int, offset: int) -> str:
    text = f"{subscription_id}\n{topic}\n{partition}\n{offset}".encode()
    return hashlib.sha256(text).digest()[:16].hex()


def lane_of(account: str, lanes: int) -> int:
    """The lane (0 <= lane < lanes) a subscription delivers an account's events through:
    always the same one, so an account's deliveries keep their order."""
    return zlib.crc32(account.encode()) % lanes


def string_to_sign(timestamp: int, delivery: str, subscription: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join((SCHEME, str(timestamp), delivery, subscription, digest)).encode()


def signature(secret: bytes, timestamp: int, delivery: str, subscription: str, body: bytes) -> str:
    message = string_to_sign(timestamp, delivery, subscription, body)
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def verify(
    secret: bytes, headers: dict[str, str], body: bytes, *, now_s: int, max_skew_s: int = 300
) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent."""
    try:
        timestamp = int(headers[TIMESTAMP])
        expected = signature(
            secret, timestamp, headers[DELIVERY_ID], headers[SUBSCRIPTION_ID], body
        )
    except (KeyError, ValueError):
        return False
    fresh = abs(now_s - timestamp) <= max_skew_s
    return fresh and hmac.compare_digest(expected, headers.get(SIGNATURE, ""))


def backoff_s(attempt: int, *, first_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, first * 2^(attempt-1))] before retry `attempt`
    (1 = the first retry)."""
    ceiling = min(max_s, first_s * 2 ** min(attempt - 1, 60))
    return rng.uniform(0, ceiling)


def global_address(address: str) -> bool:
    """Whether a resolved address is a public one (the check at connect time)."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return parsed.is_global
