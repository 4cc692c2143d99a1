"""The bounds of an event (`topics.schema.Result`, `Entry`): never tighter than what the
ledger writes, and each one refusing the first value past it. The sinks dead-letter
what the bounds refuse, so a bound tighter than the ledger would lose real events."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.ledger import apply
from tests.unit.streams.test_ledger_properties import (
    commands,
    edge_accounts,
    edge_amounts,
    edge_assets,
    ids,
    seeded_shard,
)
from topics import limits
from topics.codec import decode_result, encode
from topics.schema import Command

times = st.sampled_from([0, limits.TIME_MS_MAX, 1_764_000_000_000]) | st.integers(0, 10_000)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(commands(edge_accounts, ids, edge_amounts, edge_assets), times),
        min_size=1,
        max_size=8,
    )
)
def test_every_event_the_ledger_writes_is_within_the_bounds(
    script: list[tuple[Command, int]],
) -> None:
    shard = seeded_shard()
    for command, now in script:
        outcome = apply(shard, command, now)
        assert decode_result(encode(outcome.result)) == outcome.result
        shard.commit(outcome)


def _event(**change: Any) -> dict[str, Any]:
    entry = {"account": "a", "asset": "USD", "seq": 1, "available": 5, "held": 0,
             "delta_available": 5, "delta_held": 0}  # fmt: skip
    entry.update({k[6:]: v for k, v in change.items() if k.startswith("entry_")})
    event = {"command_id": "c", "account": "a", "kind": "deposit", "status": "applied",
             "at_ms": 1, "entries": [entry]}  # fmt: skip
    event.update({k: v for k, v in change.items() if not k.startswith("entry_")})
    return event


EDGES = [
    ("at_ms", limits.TIME_MS_MIN, limits.TIME_MS_MIN - 1),
    ("at_ms", limits.TIME_MS_MAX, limits.TIME_MS_MAX + 1),
    ("entry_seq", 1, 0),
    ("entry_seq", limits.SEQ_MAX, limits.SEQ_MAX + 1),
    ("entry_held", 0, -1),
    ("entry_held", limits.BALANCE_MAX, limits.BALANCE_MAX + 1),
    ("entry_available", limits.BALANCE_MIN, limits.BALANCE_MIN - 1),
    # Past the cap by money coming back (refunds, releases): still the ledger's.
    ("entry_available", 2 * limits.BALANCE_MAX, limits.EVENT_AVAILABLE_MAX + 1),
    ("entry_available", limits.EVENT_AVAILABLE_MAX, limits.EVENT_AVAILABLE_MAX + 1),
    ("entry_delta_available", -limits.AMOUNT_MAX, -limits.AMOUNT_MAX - 1),
    ("entry_delta_held", limits.AMOUNT_MAX, limits.AMOUNT_MAX + 1),
    ("emitted", limits.DISBURSE_LEGS_MAX, limits.DISBURSE_LEGS_MAX + 1),
    ("emitted", 0, -1),
    ("command_id", "x" * limits.INTERNAL_ID_LEN_MAX, "x" * (limits.INTERNAL_ID_LEN_MAX + 1)),
    ("command_id", "x", ""),
    ("account", "", "a" * (limits.ACCOUNT_ID_LEN_MAX + 1)),
    ("entry_account", "a" * limits.ACCOUNT_ID_LEN_MAX, ""),
    ("entry_asset", "A" * limits.ASSET_LEN_MAX, "A" * (limits.ASSET_LEN_MAX + 1)),
    ("kind", "k" * limits.KIND_LEN_MAX, "k" * (limits.KIND_LEN_MAX + 1)),
    ("detail", "d" * limits.DETAIL_LEN_MAX, "d" * (limits.DETAIL_LEN_MAX + 1)),
]


@pytest.mark.parametrize(("field", "inside", "outside"), EDGES)
def test_each_bound_takes_its_edge_and_refuses_the_next_value(
    field: str, inside: Any, outside: Any
) -> None:
    decode_result(msgspec.json.encode(_event(**{field: inside})))
    with pytest.raises(msgspec.ValidationError):
        decode_result(msgspec.json.encode(_event(**{field: outside})))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(_event())), json_values, max_size=4), st.data())
def test_any_broken_event_raises_only_the_decode_error(
    broken: dict[str, Any], data: st.DataObject
) -> None:
    """What the sink catches (msgspec.MsgspecError) is all that decoding ever raises."""
    event = {**_event(), **broken}
    entry_fields = st.sampled_from(sorted(_event()["entries"][0]))
    if data.draw(st.booleans()):
        change = data.draw(st.dictionaries(entry_fields, json_values, max_size=3))
        event["entries"] = [{**_event()["entries"][0], **change}]
    with contextlib.suppress(msgspec.MsgspecError):
        decode_result(msgspec.json.encode(event))
