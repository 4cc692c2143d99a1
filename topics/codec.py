"""Bytes on the wire <-> the structs of `topics.schema`.

Decoding a command has three outcomes, none of them an exception:
- the command itself;
- `Invalid`: the record names a usable command_id but breaks the schema, or is larger
  than limits.COMMAND_BYTES_MAX (`record_too_large`), so the engine answers it with a
  `rejected` result;
- `Undecodable`: no usable command_id (not JSON, not an object, no or a bad id),
  so the record goes to the dead-letter topic (`dead_letter`: bounded, with the
  length and digest of what it cuts).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, NamedTuple

import msgspec

from topics import limits
from topics.schema import (
    Command,
    DeadLetter,
    InternalCommand,
    PublicCommand,
    Reason,
    Result,
)


class Invalid(NamedTuple):
    """A record with a usable command_id whose content breaks the schema."""

    command_id: str
    account: str
    kind: str
    reason: Reason
    detail: str


class Undecodable(NamedTuple):
    """A record that cannot be answered with a result: it goes to the dead-letter topic."""

    reason: str


_public = msgspec.json.Decoder(PublicCommand)
_internal = msgspec.json.Decoder(InternalCommand)
_any_json = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_command_id_re = re.compile(limits.COMMAND_ID_PATTERN)
_internal_id_re = re.compile(limits.INTERNAL_ID_PATTERN)
_account_re = re.compile(limits.ACCOUNT_ID_PATTERN)
_kind_re = re.compile(limits.KIND_PATTERN)
# What msgspec raises on bytes it cannot read as JSON: besides DecodeError, invalid UTF-8
# inside a string raises UnicodeDecodeError and deep nesting raises RecursionError.
_NOT_JSON = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def decode_command(raw: bytes, *, internal: bool = False) -> Command | Invalid | Undecodable:
    """Decode one record value from the commands topic (or the internal topic)."""
    if len(raw) > limits.COMMAND_BYTES_MAX:
        return _oversize(raw, _internal_id_re if internal else _command_id_re)
    try:
        command: Command = (_internal if internal else _public).decode(raw)
        return command
    except msgspec.ValidationError as exc:
        return _salvage(raw, str(exc), _internal_id_re if internal else _command_id_re)
    except _NOT_JSON as exc:
        return Undecodable(f"malformed JSON: {exc}")


def _salvage(raw: bytes, error: str, id_re: re.Pattern[str]) -> Invalid | Undecodable:
    """Find out whether an invalid record can still be answered by command_id."""
    try:
        obj: Any = _any_json.decode(raw)
    except _NOT_JSON as exc:
        return Undecodable(f"malformed JSON: {exc}")
    if not isinstance(obj, dict):
        return Undecodable(f"not a JSON object: {error}")
    command_id = obj.get("command_id")
    if not isinstance(command_id, str) or not id_re.match(command_id):
        return Undecodable(f"no usable command_id: {error}")
    account = obj.get("account")
    kind = obj.get("kind")
    version = obj.get("v", 1)
    reason = Reason.INVALID_COMMAND
    if version != 1 or isinstance(version, bool):
        reason = Reason.UNSUPPORTED_VERSION
    return Invalid(
        command_id=command_id,
        account=account if isinstance(account, str) and _account_re.match(account) else "",
        kind=kind if isinstance(kind, str) and _kind_re.match(kind) else "",
        reason=reason,
        detail=error[: limits.DETAIL_LEN_MAX],
    )


def _oversize(raw: bytes, id_re: re.Pattern[str]) -> Invalid | Undecodable:
    """A record over the limit: answered `record_too_large` if it names a usable
    command_id. Only a record under limits.SALVAGE_DECODE_BYTES_MAX is decoded (as
    plain JSON, for its top-level fields); a larger one has only its first
    limits.SALVAGE_PREFIX_BYTES scanned, so the cost of reading it stays bounded."""
    error = f"record of {len(raw)} bytes exceeds {limits.COMMAND_BYTES_MAX}"
    fields: dict[str, Any] = {}
    if len(raw) <= limits.SALVAGE_DECODE_BYTES_MAX:
        try:
            obj: Any = _any_json.decode(raw)
        except _NOT_JSON:
            obj = None
        if isinstance(obj, dict):
            fields = obj
    else:
        prefix = raw[: limits.SALVAGE_PREFIX_BYTES]
        for name in ("command_id", "account", "kind"):
            found = _field_re[name].search(prefix)
            if found is not None:
                fields[name] = found.group(1).decode("ascii")
    command_id = fields.get("command_id")
    if not isinstance(command_id, str) or not id_re.match(command_id):
        return Undecodable(f"{error}, no usable command_id")
    account = fields.get("account")
    kind = fields.get("kind")
    return Invalid(
        command_id=command_id,
        account=account if isinstance(account, str) and _account_re.match(account) else "",
        kind=kind if isinstance(kind, str) and len(kind) <= 32 else "",
        reason=Reason.RECORD_TOO_LARGE,
        detail=error,
    )


# `"name": "value"` with a value that can only be an id (no escapes, bounded): what the
# prefix scan of an oversize record accepts.
_field_re = {
    name: re.compile(rb'"%s"\s{0,16}:\s{0,16}"([A-Za-z0-9_.:/-]{1,220})"' % name.encode())
    for name in ("command_id", "account", "kind")
}


def dead_letter(
    reason: str, *, topic: str, partition: int, offset: int, key: bytes | None, raw: bytes,
    at_ms: int, keep: int = limits.DEAD_LETTER_RAW_BYTES_MAX,
) -> DeadLetter:  # fmt: skip
    """The dead letter of a record, bounded in size whatever the record (see DeadLetter):
    the first `keep` bytes of the value, escaped, and the same of the key (`keep=0`: only
    the value's length and digest, for a dead-letter topic that refuses even the bounded
    letter)."""
    head = raw[:keep]
    return DeadLetter(
        reason=reason[: limits.DETAIL_LEN_MAX],
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        key=None
        if key is None or keep == 0
        else key[: min(keep, limits.DEAD_LETTER_KEY_BYTES_MAX)].decode("utf-8", "backslashreplace"),
        raw=head.decode("utf-8", "backslashreplace"),
        raw_len=len(raw),
        raw_sha256=hashlib.sha256(raw).hexdigest(),
        truncated=len(head) < len(raw),
        at_ms=at_ms,
    )


# A command's and a result's optional `reference` and `metadata` are their last fields.
# Left out when absent, so that such a record is byte for byte what it was before the
# fields existed: the ledger fingerprints the encoded command (a retry after an upgrade
# stays a duplicate, not `command_id_reused`), and older readers, which forbid unknown
# fields, still decode it. Unescaped, these bytes can only be the fields themselves (a
# quote inside a JSON string is escaped).
_NO_METADATA = b',"metadata":null}'
_NO_REFERENCE = b',"reference":null}'
_NEITHER = b',"reference":null,"metadata":null}'


def encode(value: msgspec.Struct) -> bytes:
    """JSON bytes of any schema struct (commands, results, dead letters)."""
    raw = _encoder.encode(value)
    if raw.endswith(_NEITHER):
        return raw[: -len(_NEITHER)] + b"}"  # the usual case, cut at once
    if raw.endswith(_NO_METADATA):
        raw = raw[: -len(_NO_METADATA)] + b"}"
    if raw.endswith(_NO_REFERENCE):
        raw = raw[: -len(_NO_REFERENCE)] + b"}"
    return raw


_result = msgspec.json.Decoder(Result)
_dead_letter = msgspec.json.Decoder(DeadLetter)


def decode_result(raw: bytes) -> Result:
    """Decode a result event; raises msgspec.MsgspecError on anything else."""
    return _result.decode(raw)


def decode_dead_letter(raw: bytes) -> DeadLetter:
    """Decode a dead-letter record; raises msgspec.MsgspecError on anything else."""
    return _dead_letter.decode(raw)
