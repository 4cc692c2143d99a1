"""`Prefer: wait=N` (RFC 7240): how long a request waits for its commands' results, and
the wait itself. The results come from `ingress.results`, whose waiters are registered
before the commands are produced."""

from __future__ import annotations

import asyncio
import re

from aiokafka.structs import RecordMetadata

from ingress.problems import Problem
from ingress.results import Waiter
from topics.schema import Result

WAIT_MAX_S = 30
_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*([^,;\s]*)", re.IGNORECASE)


def prefer_wait(header: str | list[str] | None) -> int:
    """The N of `Prefer: wait=N` (RFC 7240), 0 without one. Several Prefer headers are
    one list (RFC 9110 5.3); `wait` given twice has no one meaning and is refused."""
    if header is None:
        return 0
    joined = header if isinstance(header, str) else ",".join(header)
    matches = _WAIT.findall(joined)
    if not matches:
        return 0
    if len(matches) > 1:
        raise Problem(400, "invalid Prefer: wait", "wait is given more than once", field="Prefer")
    value = matches[0].strip('"')
    # ASCII digits only ("²".isdigit() is true), and no int() of a huge string.
    digits = value.lstrip("0") or "0"
    if not (value.isascii() and value.isdigit()) or len(digits) > 2 or int(digits) > WAIT_MAX_S:
        raise Problem(
            400,
            "invalid Prefer: wait",
            f"wait=N takes whole seconds from 0 to {WAIT_MAX_S}",
            field="Prefer",
        )
    return int(digits)


async def result_of(waiter: Waiter, meta: RecordMetadata, wait_s: int) -> Result | None:
    """The result of the acknowledged record `meta` if it comes within `wait_s`."""
    waiter.produced(meta.partition, meta.offset)
    try:
        return await asyncio.wait_for(asyncio.shield(waiter.future), wait_s)
    except TimeoutError:
        return None


async def results_of(
    produced: list[RecordMetadata | None], waiters: list[Waiter], wait_s: int
) -> list[Result | None]:
    """Each acknowledged command's result if it came within `wait_s` (one deadline
    for the whole batch), in the order of the acknowledged commands."""
    if not wait_s:
        return [None] * sum(m is not None for m in produced)
    acked = [(w, m) for w, m in zip(waiters, produced, strict=True) if m is not None]
    for waiter, meta in acked:
        waiter.produced(meta.partition, meta.offset)
    if not acked:
        return []
    futures = [asyncio.shield(w.future) for w, _ in acked]
    await asyncio.wait(futures, timeout=wait_s)
    return [w.future.result() if w.future.done() else None for w, _ in acked]
