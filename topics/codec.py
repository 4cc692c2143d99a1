"""Bytes on the wire <-> the structs of `topics.schema`.

Decoding a command has three outcomes, none of them an exception:
- the command itself;
- `Invalid`: the record names a usable command_id but breaks the schema, so the
  engine answers it with a `rejected` result;
- `Undecodable`: no usable command_id (not JSON, not an object, no or a bad id),
  so the record goes to the dead-letter topic with its raw bytes.
"""

from __future__ import annotations

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
        return Undecodable(f"record of {len(raw)} bytes exceeds {limits.COMMAND_BYTES_MAX}")
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


def encode(value: msgspec.Struct) -> bytes:
    """JSON bytes of any schema struct (commands, results, dead letters)."""
    return _encoder.encode(value)


_result = msgspec.json.Decoder(Result)
_dead_letter = msgspec.json.Decoder(DeadLetter)


def decode_result(raw: bytes) -> Result:
    """Decode a result event; raises msgspec.MsgspecError on anything else."""
    return _result.decode(raw)


def decode_dead_letter(raw: bytes) -> DeadLetter:
    """Decode a dead-letter record; raises msgspec.MsgspecError on anything else."""
    return _dead_letter.decode(raw)
