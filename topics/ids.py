"""The ids of the internal commands the engine derives from a client command.

Derived ids must be unique across shards: idempotency records live per shard, so two
payers on different shards may both use client id "order-1". Prefixing the payer makes
"<payer>/order-1/credit" unique, because (payer, client id) is unique on the payer's
shard. The collector and the tests use these same functions to predict what a result
implies (see `Result.emitted`).
"""

from __future__ import annotations

from urllib.parse import quote


def credit_id(payer: str, command_id: str, leg: int | None = None) -> str:
    """The credit of a transfer or capture (leg None), or of disbursement leg `leg`."""
    base = f"{payer}/{command_id}/credit"
    return base if leg is None else f"{base}/{leg}"


def refund_id(credit: str) -> str:
    """The refund of a credit the payee's shard could not apply."""
    return f"{credit}/refund"


def path_segment(value: str) -> str:
    """An id as one URL path segment, encoded so that no URL library changes it on the
    way: every reserved character escaped, and dots too, or "." and ".." would be read
    as path steps. (A signed request must go out exactly as it was signed.)"""
    return quote(value, safe="").replace(".", "%2E")
