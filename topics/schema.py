"""The one definition of every command and event on Tally's topics (schema version 1).

The ingress validates with it, the engine decodes with it, the sinks read it and the
tests generate data from it. JSON on the wire; amounts are integers in minor units,
1 to 2^127-1, and balances exact integers of any size (floats, strings and booleans are
refused by the decoder, not coerced).
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec

from topics import limits

SCHEMA_VERSION = 1

AccountId = Annotated[
    str,
    msgspec.Meta(
        pattern=limits.ACCOUNT_ID_PATTERN,
        description="1-64 characters of [A-Za-z0-9_.:-]",
    ),
]
Asset = Annotated[
    str,
    msgspec.Meta(pattern=limits.ASSET_PATTERN, description="1-12 characters of [A-Z0-9]"),
]
CommandId = Annotated[
    str,
    msgspec.Meta(
        pattern=limits.COMMAND_ID_PATTERN,
        description="client-chosen idempotency key, 1-128 characters of [A-Za-z0-9_.:-]",
    ),
]
Reference = Annotated[
    str,
    msgspec.Meta(
        pattern=limits.REFERENCE_PATTERN,
        description="the client's own reference (an order id): 1-128 characters of [A-Za-z0-9_.:-]",
    ),
]
Metadata = Annotated[
    dict[
        Annotated[str, msgspec.Meta(pattern=limits.METADATA_KEY_PATTERN)],
        Annotated[str, msgspec.Meta(pattern=limits.METADATA_VALUE_PATTERN)],
    ],
    msgspec.Meta(
        max_length=limits.METADATA_KEYS_MAX,
        description="the client's own strings, carried and never interpreted: at most 16 "
        "keys of 1-40 characters of [A-Za-z0-9_.:-], values of up to 500 characters (no "
        "NUL), at most 1024 bytes as compact JSON",
    ),
]
InternalId = Annotated[str, msgspec.Meta(pattern=limits.INTERNAL_ID_PATTERN)]
HoldId = Annotated[str, msgspec.Meta(pattern=limits.HOLD_ID_PATTERN)]
# msgspec cannot bound an int beyond 64 bits in a Meta: the upper bounds of Amount and
# Limit are stated for JSON Schema here and checked by `_bounded` in __post_init__.
Amount = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        extra_json_schema={"maximum": limits.AMOUNT_MAX},
        description="minor units, an integer from 1 to 2^127-1 (JSON number, exact; "
        "above 2^53 parse it with a big-integer-aware JSON reader)",
    ),
]
Limit = Annotated[
    int,
    msgspec.Meta(
        ge=0,
        extra_json_schema={"maximum": limits.LIMIT_MAX},
        description="minor units, an integer from 0 to 2^127-1",
    ),
]
# A time a client gives (a hold's expiry): epoch milliseconds within the range the engine
# and the stores use (see limits.TIME_MS_MAX); a time past it is refused as invalid.
EpochMs = Annotated[int, msgspec.Meta(ge=0, le=limits.TIME_MS_MAX)]
# A balance or a delta in an event: any integer (see limits for the bound rule).
Money = Annotated[int, msgspec.Meta(description="minor units, an exact integer of any size")]


def metadata_bytes(metadata: dict[str, str]) -> int:
    """The size a command's metadata is bounded by: its compact JSON encoding."""
    return len(_metadata_encoder.encode(metadata))


_metadata_encoder = msgspec.json.Encoder()


def _bounded_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is not None and metadata_bytes(metadata) > limits.METADATA_BYTES_MAX:
        raise ValueError(
            f"Expected metadata of at most {limits.METADATA_BYTES_MAX} bytes as JSON"
            " - at `$.metadata`"
        )


def _bounded(value: int | None, field: str, most: int = limits.AMOUNT_MAX) -> None:
    """The 128-bit upper bound msgspec cannot check; the message reads like msgspec's
    own, with the field's path, so that the ingress names the field at fault."""
    if value is not None and value > most:
        raise ValueError(f"Expected `int` <= {most} - at `$.{field}`")


AccountStatus = Literal["active", "frozen", "closed"]

# The bounds of an event's fields. An event is written by the engine only, but the sinks
# read whatever is on the events topic: every field a store writes is bounded here, so
# an event no store can hold fails to decode and is dead-lettered, instead of stopping
# a sink. Each bound is what the ledger can produce, never tighter.
EventTime = Annotated[int, msgspec.Meta(ge=limits.TIME_MS_MIN, le=limits.TIME_MS_MAX)]
Seq = Annotated[int, msgspec.Meta(ge=1, le=limits.SEQ_MAX)]


# The money fields of an entry are bounded by `Entry.__post_init__` in Python: msgspec's
# Meta takes only bounds that fit in 64 bits. (Measured by the change that added these
# bounds: a Python check per entry costs the sinks' decoding about half its speed; it is
# the price of bounds past 64 bits.)
# Strings are bounded by length, not by their patterns: a regex per string made decoding
# an event about four times slower, and the sinks decode every event. A string no store
# can hold (a NUL, for PostgreSQL) is refused by the store, and the sink isolates that
# event (`sinks.runner`); the engine writes only ids that match their patterns.
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.INTERNAL_ID_LEN_MAX)]
EventAccount = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.ACCOUNT_ID_LEN_MAX)]
EventAsset = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.ASSET_LEN_MAX)]
ResultAccount = Annotated[str, msgspec.Meta(max_length=limits.ACCOUNT_ID_LEN_MAX)]
ResultKind = Annotated[str, msgspec.Meta(max_length=limits.KIND_LEN_MAX)]
EventReference = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.REFERENCE_LEN_MAX)]
EventMetadata = Annotated[
    dict[
        Annotated[str, msgspec.Meta(min_length=1, max_length=limits.METADATA_KEY_LEN_MAX)],
        Annotated[str, msgspec.Meta(max_length=limits.METADATA_VALUE_LEN_MAX)],
    ],
    msgspec.Meta(max_length=limits.METADATA_KEYS_MAX),
]
Detail = Annotated[str, msgspec.Meta(max_length=limits.DETAIL_LEN_MAX)]


class _Base(
    msgspec.Struct,
    tag_field="kind",
    forbid_unknown_fields=True,
    frozen=True,
    kw_only=True,
):
    """Fields every command carries. `account` is the paying or owning account: it is
    the Kafka key, so it decides the partition the command is applied on.

    `reference` and `metadata` are the client's own, optional on every command, carried
    to the result event (and a payee's credit) and never interpreted. Being defaults of
    this keyword-only base, they encode last, and `topics.codec.encode` leaves them out
    when absent: a command without them encodes, and so fingerprints, as it did before
    they existed, and old records decode unchanged."""

    v: Literal[1] = 1
    account: AccountId
    reference: Reference | None = None
    metadata: Metadata | None = None

    def __post_init__(self) -> None:
        if self.metadata is not None:  # most commands carry none: no call then
            _bounded_metadata(self.metadata)


class _Command(_Base, frozen=True):
    command_id: CommandId


class _Internal(_Base, frozen=True):
    command_id: InternalId


class Deposit(_Command, tag="deposit", frozen=True):
    """Money enters the system: credit `amount` of `asset` to `account`."""

    asset: Asset
    amount: Amount

    def __post_init__(self) -> None:
        super().__post_init__()
        _bounded(self.amount, "amount")


class Withdraw(_Command, tag="withdraw", frozen=True):
    """Money leaves the system: debit `amount` of `asset` from `account`."""

    asset: Asset
    amount: Amount

    def __post_init__(self) -> None:
        super().__post_init__()
        _bounded(self.amount, "amount")


class Transfer(_Command, tag="transfer", frozen=True):
    """Debit `account`, credit `to` (possibly on another partition)."""

    to: AccountId
    asset: Asset
    amount: Amount

    def __post_init__(self) -> None:
        super().__post_init__()
        _bounded(self.amount, "amount")


class Leg(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One payee of a disbursement."""

    to: AccountId
    amount: Amount


class Disburse(_Command, tag="disburse", frozen=True):
    """One debit of the sum of the legs from `account`, one credit per leg."""

    asset: Asset
    legs: Annotated[list[Leg], msgspec.Meta(min_length=1, max_length=limits.DISBURSE_LEGS_MAX)]

    def __post_init__(self) -> None:
        super().__post_init__()
        for index, leg in enumerate(self.legs):
            _bounded(leg.amount, f"legs[{index}].amount")


class Hold(_Command, tag="hold", frozen=True):
    """Reserve `amount` of `account`'s available funds under `hold_id`, optionally
    until `expires_at_ms` (epoch milliseconds), after which the engine releases it."""

    hold_id: HoldId
    asset: Asset
    amount: Amount
    expires_at_ms: EpochMs | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _bounded(self.amount, "amount")


class Release(_Command, tag="release", frozen=True):
    """Give a hold's whole amount back to available."""

    hold_id: HoldId


class Capture(_Command, tag="capture", frozen=True):
    """Settle `amount` of a hold (all of it when absent) out of the system, or to
    account `to`; the rest of the hold is released."""

    hold_id: HoldId
    amount: Amount | None = None
    to: AccountId | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _bounded(self.amount, "amount")


class Configure(_Command, tag="configure", frozen=True):
    """Change an account's status, or its overdraft limit for one asset."""

    status: AccountStatus | None = None
    asset: Asset | None = None
    overdraft_limit: Limit | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _bounded(self.overdraft_limit, "overdraft_limit", limits.LIMIT_MAX)


# Internal commands: the engine emits these to its own internal topic, never clients.
# They travel between partitions to finish what one partition started.


class Credit(_Internal, tag="credit", frozen=True):
    """The payee's half of a transfer, disbursement or capture."""

    asset: Asset
    amount: Amount
    origin_command_id: CommandId
    origin_account: AccountId

    def __post_init__(self) -> None:
        super().__post_init__()
        _bounded(self.amount, "amount")


class Refund(_Internal, tag="refund", frozen=True):
    """Gives back to the payer a credit the payee's partition could not apply."""

    asset: Asset
    amount: Amount
    origin_command_id: CommandId
    reason: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _bounded(self.amount, "amount")


class Expire(_Internal, tag="expire", frozen=True):
    """Asks the owning partition to release a hold whose expiry time has passed."""

    hold_id: HoldId


PublicCommand = Deposit | Withdraw | Transfer | Disburse | Hold | Release | Capture | Configure
InternalCommand = Credit | Refund | Expire
Command = PublicCommand | InternalCommand

PUBLIC_KINDS: tuple[str, ...] = (
    "deposit",
    "withdraw",
    "transfer",
    "disburse",
    "hold",
    "release",
    "capture",
    "configure",
)
INTERNAL_KINDS: tuple[str, ...] = ("credit", "refund", "expire")


class Status(enum.StrEnum):
    APPLIED = "applied"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"


class Reason(enum.StrEnum):
    """Why a command was rejected. Checked in the order the ledger documents."""

    INVALID_COMMAND = "invalid_command"
    UNSUPPORTED_VERSION = "unsupported_version"
    COMMAND_ID_REUSED = "command_id_reused"
    ACCOUNT_FROZEN = "account_frozen"
    ACCOUNT_CLOSED = "account_closed"
    ACCOUNT_NOT_EMPTY = "account_not_empty"
    SAME_ACCOUNT = "same_account"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    BALANCE_OVERFLOW = "balance_overflow"
    HOLD_EXISTS = "hold_exists"
    HOLD_NOT_FOUND = "hold_not_found"
    HOLD_EXPIRED = "hold_expired"
    HOLD_NOT_EXPIRED = "hold_not_expired"
    AMOUNT_EXCEEDS_HOLD = "amount_exceeds_hold"
    NOTHING_TO_CONFIGURE = "nothing_to_configure"
    # Over limits.COMMAND_BYTES_MAX, or its outcome would write a record over
    # limits.OUTPUT_BYTES_MAX: not applied, nothing remembered.
    RECORD_TOO_LARGE = "record_too_large"
    # A balance in one more asset than limits.ACCOUNT_ASSETS_MAX.
    TOO_MANY_ASSETS = "too_many_assets"


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One balance change: the (account, asset) balance after it, and what moved."""

    account: EventAccount
    asset: EventAsset
    seq: Seq
    available: Money
    held: Money
    delta_available: Money
    delta_held: Money

    def __post_init__(self) -> None:
        # msgspec turns this ValueError into the decode's ValidationError. The bounds are
        # what the ledger can write (limits: the balance bound rule): `available` from
        # -overdraft down to BALANCE_MIN up to past the cap by money coming back, `held`
        # never past the cap, every delta one amount with a sign.
        low, high = limits.BALANCE_MIN, limits.EVENT_AVAILABLE_MAX
        if not low <= self.available <= high:
            raise ValueError(f"available outside [{low}, {high}]")
        if not 0 <= self.held <= limits.BALANCE_MAX:
            raise ValueError(f"held outside [0, {limits.BALANCE_MAX}]")
        most = limits.AMOUNT_MAX
        if not -most <= self.delta_available <= most:
            raise ValueError(f"delta_available outside [{-most}, {most}]")
        if not -most <= self.delta_held <= most:
            raise ValueError(f"delta_held outside [{-most}, {most}]")


class FirstResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a repeated command_id points at: the outcome of its first application."""

    status: Status
    reason: Reason | None = None
    at_ms: EventTime


class Result(msgspec.Struct, frozen=True, kw_only=True):
    """The one result event a command gets, keyed by `account` on the events topic.

    `entries` lists every balance the command changed on this partition, in order;
    a rejected or duplicate command changes nothing and has none. `emitted` counts the
    internal commands the outcome sent to other shards, whose ids derive from this one
    by `topics.ids`: "<account>/<id>/credit" (transfer, capture to an account),
    "<account>/<id>/credit/<i>" (disbursement leg i), "<id>/refund" (a rejected credit).
    """

    v: Literal[1] = 1
    # Client ids and the engine's derived ids (expire.<digest> fits both patterns).
    command_id: EventId
    account: ResultAccount
    kind: ResultKind
    status: Status
    reason: Reason | None = None
    detail: Detail | None = None
    first: FirstResult | None = None
    # One entry per balance changed on this shard: the payer's, or a hold's account's.
    entries: Annotated[list[Entry], msgspec.Meta(max_length=limits.DISBURSE_LEGS_MAX + 1)] = []
    emitted: Annotated[int, msgspec.Meta(ge=0, le=limits.DISBURSE_LEGS_MAX)] = 0
    at_ms: EventTime
    # The command's own reference and metadata (a credit's are its origin's). Last, and
    # left out of the encoding when absent (topics.codec.encode), like a command's.
    reference: EventReference | None = None
    metadata: EventMetadata | None = None


# A result event of a client command carries this Kafka header: "<partition>:<offset>" of
# the commands-topic record it answers. A command_id can be sent more than once (a
# retry is answered `duplicate`), so the id alone does not say which sending a result
# belongs to; the ingress matches on this to hand each request its own result.
# A record the engine forwards from a wrong partition (a producer that does not hash
# with murmur2, kcat say) carries the same header on its copy, naming the record the
# client produced, so that the copy's result names that record too.
SOURCE_HEADER = "tally-source"


def source(partition: int, offset: int) -> bytes:
    """The SOURCE_HEADER value naming a commands record."""
    return b"%d:%d" % (partition, offset)


def source_in(headers: Any) -> bytes | None:
    """The SOURCE_HEADER value among a Kafka record's headers, if it has one."""
    if not headers:
        return None  # most records: no generator made
    return next((bytes(v) for k, v in headers if k == SOURCE_HEADER), None)


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A record the engine could not answer with a result: no usable command_id.

    Bounded in size whatever the record was (limits.DEAD_LETTER_BYTES_MAX): `raw` is the
    first limits.DEAD_LETTER_RAW_BYTES_MAX bytes of the record's value as text
    (undecodable bytes backslash-escaped, `\\xff`), `truncated` says whether that was all
    of it, and `raw_len` and `raw_sha256` are the length and digest of the whole value.
    Nothing is lost: the record itself stays at `source_offset` of its topic. `key` is
    cut the same way to limits.DEAD_LETTER_KEY_BYTES_MAX. Letters written before these
    fields existed carry the whole value in `raw` and decode with the defaults.
    """

    v: Literal[1] = 1
    reason: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: str | None
    raw: str
    raw_len: int | None = None
    raw_sha256: str | None = None
    truncated: bool = False
    at_ms: int


def kind_of(command: Command) -> str:
    """A command's kind: its tag on the wire ("deposit", "credit", ...)."""
    kind = _kinds.get(type(command))
    if kind is None:
        kind = _kinds[type(command)] = str(type(command).__struct_config__.tag)
    return kind


# Struct class -> its tag, filled by `kind_of` (once per class: it is asked per command).
_kinds: dict[type, str] = {}
