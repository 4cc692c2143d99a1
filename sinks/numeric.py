"""Python ints <-> PostgreSQL `numeric` in its binary wire format, for the sink's COPY.

asyncpg encodes an int into `numeric` exactly, but through `decimal.Decimal` and its
digit tuple: measured, that made the PostgreSQL sink's COPY of money columns about three
times slower than `bigint`. Money here is always an integer, so this codec packs the
base-10000 digits straight from the int (small values, the common case, in one or two
divisions). PostgreSQL's `numeric_recv` strips leading and trailing zero digits itself,
so the digits are sent as computed and what is stored is canonical.

Binary layout (PostgreSQL `numeric_send`): int16 ndigits, int16 weight (the power of
10000 of the first digit), uint16 sign (0x0000 positive, 0x4000 negative, 0xC000 NaN),
int16 dscale (digits after the decimal point), then ndigits uint16 base-10000 digits,
most significant first.
"""

from __future__ import annotations

import struct

import asyncpg

_BASE = 10_000
_NEGATIVE = 0x4000
_HEAD = struct.Struct("!hhHh")
# One struct per digit count: 35 digits hold 10^140, far beyond any balance.
_PACK = [struct.Struct(f"!hhHh{k}H") for k in range(36)]


def encode(n: int) -> bytes:
    """An int as a binary `numeric` value (dscale 0)."""
    sign = 0
    if n < 0:
        sign = _NEGATIVE
        n = -n
    if n < _BASE * _BASE:
        if n < _BASE:
            return _PACK[1].pack(1, 0, sign, 0, n)
        high, low = divmod(n, _BASE)
        return _PACK[2].pack(2, 1, sign, 0, high, low)
    digits: list[int] = []
    while n:
        n, digit = divmod(n, _BASE)
        digits.append(digit)
    digits.reverse()
    count = len(digits)
    pack = _PACK[count] if count < len(_PACK) else struct.Struct(f"!hhHh{count}H")
    return pack.pack(count, count - 1, sign, 0, *digits)


def decode(raw: bytes) -> int:
    """A binary `numeric` value as an int; a NaN or a fraction is refused (Tally's money
    columns hold integers only)."""
    count, weight, sign, dscale = _HEAD.unpack_from(raw)
    if sign not in (0, _NEGATIVE):
        raise ValueError("numeric NaN or infinity is not an amount")
    n = 0
    for digit in struct.unpack_from(f"!{count}H", raw, _HEAD.size):
        n = n * _BASE + digit
    exponent = weight - count + 1
    scale: int = _BASE ** abs(exponent)
    if exponent >= 0:
        n *= scale
    elif n % scale:
        raise ValueError(f"numeric with a fraction (dscale {dscale}) is not an amount")
    else:
        n //= scale
    return -n if sign == _NEGATIVE else n


async def use_int_codec(conn: asyncpg.Connection) -> None:
    """Make `conn` send and receive `numeric` as ints through this codec."""
    await conn.set_type_codec(
        "numeric", schema="pg_catalog", encoder=encode, decoder=decode, format="binary"
    )
