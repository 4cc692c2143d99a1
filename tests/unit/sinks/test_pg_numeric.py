"""The sink's int <-> PostgreSQL binary `numeric` codec: exact at every bound, and the
same bytes as PostgreSQL's own canonical form once its leading/trailing zeros go."""

from __future__ import annotations

import decimal
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinks import numeric

BOUNDS = [0, 1, -1, 9_999, 10_000, 10**8, 2**53, 2**63 - 1, 2**63, 2**64, 2**127 - 1,
          -(2**127 - 1), 2**128, 5 * 2**127, 10**40, 10**139]  # fmt: skip


def _reference(n: int) -> tuple[int, int, list[int]]:
    """(weight, sign, digits) by way of Decimal, without zero digits at either end."""
    sign, digits, _ = decimal.Decimal(n).as_tuple()
    text = "".join(map(str, digits)).lstrip("0")
    if not text:
        return 0, 0, []
    text = text.zfill(-(-len(text) // 4) * 4)
    groups = [int(text[i : i + 4]) for i in range(0, len(text), 4)]
    weight = len(groups) - 1
    while groups and groups[-1] == 0:
        groups.pop()
    return weight, 0x4000 if sign else 0, groups


def _canonical(raw: bytes) -> tuple[int, int, list[int]]:
    count, weight, sign, dscale = struct.unpack_from("!hhHh", raw)
    assert dscale == 0
    digits = list(struct.unpack_from(f"!{count}H", raw, 8))
    while digits and digits[0] == 0:
        digits.pop(0)
        weight -= 1
    while digits and digits[-1] == 0:
        digits.pop()
    if not digits:
        return 0, 0, []
    return weight, sign, digits


@pytest.mark.parametrize("n", BOUNDS)
def test_every_bound_round_trips_and_matches_decimal(n: int) -> None:
    raw = numeric.encode(n)
    assert numeric.decode(raw) == n
    assert _canonical(raw) == _reference(n)


@given(st.integers(-(2**200), 2**200))
def test_any_int_round_trips(n: int) -> None:
    assert numeric.decode(numeric.encode(n)) == n
    assert _canonical(numeric.encode(n)) == _reference(n)


def test_a_fraction_or_nan_is_not_an_amount() -> None:
    half = struct.pack("!hhHhH", 1, -1, 0, 1, 5000)  # 0.5
    with pytest.raises(ValueError, match="fraction"):
        numeric.decode(half)
    with pytest.raises(ValueError, match="NaN"):
        numeric.decode(struct.pack("!hhHh", 0, 0, 0xC000, 0))
    # 1.0000 (dscale 4, a whole number) is still the int 1.
    assert numeric.decode(struct.pack("!hhHhH", 1, 0, 0, 4, 1)) == 1
