"""Every bound of the wire contract in one place, each with the reason it exists."""

from __future__ import annotations

from typing import Final

# Balances, amounts and limits are signed 64-bit integers in the asset's minor unit, so
# that every store on the way (Kafka JSON readers, PostgreSQL BIGINT, Redis) holds them
# without loss. Python ints do not overflow; the ledger checks against these instead.
AMOUNT_MAX: Final = 2**63 - 1
BALANCE_MIN: Final = -(2**63)

# Every pattern ends in (?!\n)$: Python's '$' also matches before a final newline, so
# "alice\n" would pass a plain '^...$'; the lookahead refuses it (and means the same
# in the ECMA regex dialect of JSON Schema).

# An account id is short enough for a Kafka key and a Redis key, and free of the
# separators ('|', '{', '}', '/', whitespace) that the stores and derived ids use.
ACCOUNT_ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,64}(?!\n)$"
ACCOUNT_ID_LEN_MAX: Final = 64
ASSET_PATTERN: Final = r"^[A-Z0-9]{1,12}(?!\n)$"
ASSET_LEN_MAX: Final = 12

# Client-chosen idempotency keys (a UUID fits). '/' is kept out of client ids because the
# engine derives the ids of the internal commands it emits as "<command_id>/<suffix>".
COMMAND_ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,128}(?!\n)$"
COMMAND_ID_LEN_MAX: Final = 128
# Ids of internal commands: "<payer>/<client id>/credit[/<leg>][/refund]" (topics.ids).
INTERNAL_ID_PATTERN: Final = r"^[A-Za-z0-9_.:/-]{1,220}(?!\n)$"
HOLD_ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,64}(?!\n)$"

# One disbursement fans out to at most this many payees: it bounds the size of one
# command record (about 100 bytes a leg) and the work one command may cause.
DISBURSE_LEGS_MAX: Final = 1000

# A raw record larger than this is not decoded at all: 1,000 legs fit in ~120 KiB.
COMMAND_BYTES_MAX: Final = 256 * 1024

# A rejection's human-readable detail is cut to this length so that a hostile record
# cannot make the engine write large events.
DETAIL_LEN_MAX: Final = 300

# A record over COMMAND_BYTES_MAX is still read for its command_id, account and kind, so
# that a client waiting on it hears back (`record_too_large`); but never by decoding
# megabytes of JSON: up to this size it is decoded as JSON (Kafka's default record limit
# is 1 MiB, so this is about half of the largest record a producer can send), beyond it
# only its first SALVAGE_PREFIX_BYTES are scanned for those three fields.
SALVAGE_DECODE_BYTES_MAX: Final = 512 * 1024
SALVAGE_PREFIX_BYTES: Final = 4096

# A dead letter carries at most this much of the record's value and key, as text with
# undecodable bytes backslash-escaped; the value's full length and sha256 stand for the
# rest (the record itself stays in its topic at source_offset). Escaping costs at most 6
# bytes a byte in JSON ("\u0000"), so a letter stays under DEAD_LETTER_BYTES_MAX whatever
# the record was: far below the 1 MiB the broker takes, which a letter carrying every
# byte escaped (4-5x the record) once passed and crash-looped the worker (issue #13).
DEAD_LETTER_RAW_BYTES_MAX: Final = 4096
DEAD_LETTER_KEY_BYTES_MAX: Final = 256
DEAD_LETTER_BYTES_MAX: Final = 32 * 1024

# No record the engine writes (result, credit, forwarded copy, dead letter, changelog
# value) may be larger than this: under aiokafka's max_request_size (1 MiB) and the
# broker's default message.max.bytes (1 MiB + 12), with room for the record's framing.
# A batch whose outputs would break it is split until the record that causes it is
# found, and that record is answered with `record_too_large` or dead-lettered.
OUTPUT_BYTES_MAX: Final = 1_000_000
