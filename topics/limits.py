"""Every bound of the wire contract in one place, each with the reason it exists."""

from __future__ import annotations

from typing import Final

# Money is exact integers in the asset's minor unit, 128-bit wide so that 18-decimal
# tokens fit (TigerBeetle's u128 amounts): 2^127-1 wei is about 1.7e20 whole tokens.
# msgspec cannot state integer bounds beyond 64 bits in a `Meta`, so `topics.schema`
# checks these in the structs' `__post_init__` (decoding and constructing alike).
# Every amount of every command (deposit, withdraw, transfer, disburse leg and total,
# hold, capture, credit, refund) is 1..AMOUNT_MAX; an overdraft limit is 0..LIMIT_MAX.
AMOUNT_MAX: Final = 2**127 - 1
LIMIT_MAX: Final = 2**127 - 1

# The balance bound rule (streams.ledger applies it; see its docstring):
# - credits that bring money from outside the balance (deposit, the credit half of a
#   transfer, disbursement or capture) are refused `balance_overflow` when `available`
#   would pass BALANCE_MAX, and a hold is refused when `held` would pass it;
# - moves that give a balance back its own money (refund, release, expiry, the released
#   rest of a capture) are never refused, or conservation would break; so `available`
#   can pass BALANCE_MAX, by at most what was in flight back to it;
# - debits stop at -overdraft_limit, so `available` never goes below BALANCE_MIN.
# Every store is therefore unbounded-width: Python ints in the engine, JSON integers
# on the wire, in RocksDB and in changelogs, PostgreSQL `numeric` (no precision limit),
# decimal strings in Redis. Nothing on the way is a 64-bit or 128-bit type.
BALANCE_MAX: Final = 2**127 - 1
BALANCE_MIN: Final = -LIMIT_MAX
# What a sink accepts as an event's `available`: a balance past BALANCE_MAX is the cap
# plus money of its own on the way back (each refund or release at most AMOUNT_MAX), so
# no real ledger comes near 2^255; an event beyond it is not the engine's, and is
# dead-lettered by the sinks instead of written (PostgreSQL numeric and Redis strings
# would hold it, but nothing downstream should have to).
EVENT_AVAILABLE_MAX: Final = 2**255 - 1

# Times (epoch milliseconds) stay signed 64-bit.
INT64_MAX: Final = 2**63 - 1

# Every pattern ends in (?!\n)$: Python's '$' also matches before a final newline, so
# "alice\n" would pass a plain '^...$'; the lookahead refuses it (and means the same
# in the ECMA regex dialect of JSON Schema).

# An account id is short enough for a Kafka key and a Redis key, and free of the
# separators ('|', '{', '}', '/', whitespace) that the stores and derived ids use.
ACCOUNT_ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,64}(?!\n)$"
ACCOUNT_ID_LEN_MAX: Final = 64
ASSET_PATTERN: Final = r"^[A-Z0-9]{1,12}(?!\n)$"
ASSET_LEN_MAX: Final = 12

# The kind a rejected record called itself is echoed in its result only if it is made of
# these characters (so that no control character reaches a store), else "".
KIND_PATTERN: Final = r"^[A-Za-z0-9_.:-]{0,32}(?!\n)$"
KIND_LEN_MAX: Final = 32

# Client-chosen idempotency keys (a UUID fits). '/' is kept out of client ids because the
# engine derives the ids of the internal commands it emits as "<command_id>/<suffix>".
COMMAND_ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,128}(?!\n)$"
COMMAND_ID_LEN_MAX: Final = 128
# Ids of internal commands: "<payer>/<client id>/credit[/<leg>][/refund]" (topics.ids).
INTERNAL_ID_PATTERN: Final = r"^[A-Za-z0-9_.:/-]{1,220}(?!\n)$"
INTERNAL_ID_LEN_MAX: Final = 220
HOLD_ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,64}(?!\n)$"

# A client's own reference on a command (an order id, an invoice number), searchable by
# `GET /v1/commands?reference=`: the same alphabet and length as a command id, so that it
# is safe in a URL query, a log line and an index key without escaping.
REFERENCE_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,128}(?!\n)$"
REFERENCE_LEN_MAX: Final = 128
# A command's metadata is a flat object of strings the ledger only carries: it travels on
# the command, the result event, a payee's credit and every store row, so it is small.
# 16 keys and 1 KiB of encoded JSON fit a few ids and notes (Stripe allows 50 keys of 500
# characters, but its metadata is not copied to every entry); keys use the id alphabet so
# that they can be queried in PostgreSQL's jsonb without quoting; values are free text
# without NUL (PostgreSQL's text and jsonb cannot hold U+0000) of up to
# METADATA_VALUE_LEN_MAX characters.
METADATA_KEYS_MAX: Final = 16
METADATA_KEY_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,40}(?!\n)$"
METADATA_KEY_LEN_MAX: Final = 40
METADATA_VALUE_PATTERN: Final = r"^[^\x00]{0,500}(?!\n)$"
METADATA_VALUE_LEN_MAX: Final = 500
METADATA_BYTES_MAX: Final = 1024

# One disbursement fans out to at most this many payees: it bounds the size of one
# command record (about 100 bytes a leg) and the work one command may cause.
DISBURSE_LEGS_MAX: Final = 1000

# One account holds balances in at most this many assets. Its settings row (status and
# the list of its assets, which closing the account checks) is one changelog value: an
# account crediting itself into ever more assets would otherwise grow that value past
# OUTPUT_BYTES_MAX (about 66,000 assets of 12 characters), and then every command on the
# account, a payee's credit among them, could only be isolated, not applied. A new asset
# past the bound is rejected `too_many_assets` (a rejected credit is refunded: its payer
# already holds the asset). 1,000 assets of 12 characters is a value of about 15 KiB.
ACCOUNT_ASSETS_MAX: Final = 1000

# A raw record larger than this is not decoded at all: 1,000 legs fit in ~120 KiB.
COMMAND_BYTES_MAX: Final = 256 * 1024

# A rejection's human-readable detail is cut to this length so that a hostile record
# cannot make the engine write large events.
DETAIL_LEN_MAX: Final = 300

# Times on events (`at_ms`, a result's first `at_ms`) are epoch milliseconds from 1970 up
# to the last millisecond of the year 9999: the range every store on the way can hold
# (Python's datetime, and so asyncpg's timestamptz, ends with the year 9999). The engine
# stamps them with its own clock; an event outside is not the engine's and is refused.
TIME_MS_MIN: Final = 0
TIME_MS_MAX: Final = 253_402_300_799_999

# A balance's `seq` counts its changes from 1 with no gaps; the stores keep it as a
# signed 64-bit integer.
SEQ_MAX: Final = 2**63 - 1

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
