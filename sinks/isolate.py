"""Finding the events a store refuses for their content, in a batch it refused whole.

The batch is split in halves, and halves again, each part written on its own, until
the events the store refuses are found alone: about 2 log2(n) writes per refused event.
Parts move no offsets (each is written with the offsets the batch started from), and
are written in the batch's order, so balances still only move forward; the caller
dead-letters the refused events and then writes the batch's end offsets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from sinks.batch import Batch, one_line

Write = Callable[[Batch], Awaitable[None]]
IsContentError = Callable[[BaseException], bool]


async def refused_events(
    write: Write, content_error: IsContentError, batch: Batch, error: BaseException
) -> list[tuple[int, str]]:
    """(index, store error) of the events of `batch`, which the store refused with
    `error`, that it refuses alone; every other event is written."""
    if len(batch.events) == 1:
        return [(0, one_line(error))]
    return await _isolate(write, content_error, batch, list(range(len(batch.events))))


async def _isolate(
    write: Write, content_error: IsContentError, batch: Batch, indices: list[int]
) -> list[tuple[int, str]]:
    """Of `batch[indices]` (two or more, refused together): halves, depth first in
    order."""
    refused: list[tuple[int, str]] = []
    middle = len(indices) // 2
    for half in (indices[:middle], indices[middle:]):
        error = await _write_part(write, content_error, batch, half)
        if error is None:
            continue
        if len(half) == 1:
            refused.append((half[0], error))
        else:
            refused += await _isolate(write, content_error, batch, half)
    return refused


async def _write_part(
    write: Write, content_error: IsContentError, batch: Batch, indices: list[int]
) -> str | None:
    """Write some events of `batch` with no offset moved (each partition's offsets are
    written as the batch's start); the store's error when their content is refused,
    else None."""
    events = [batch.events[i] for i in indices]
    shards = sorted({shard for shard, _ in events})
    start = {p: batch.start.get(p, 0) for p in shards}
    part = dataclasses.replace(
        batch, events=events, sources=[batch.sources[i] for i in indices], offsets=start
    )
    part.start = dict(start)
    try:
        await write(part)
    except Exception as error:
        if not content_error(error):
            raise
        return one_line(error)
    return None


def without(batch: Batch, refused: list[tuple[int, str]]) -> Batch:
    """The batch as written: without the refused events."""
    skip = {i for i, _ in refused}
    kept = [i for i in range(len(batch.events)) if i not in skip]
    return dataclasses.replace(
        batch,
        events=[batch.events[i] for i in kept],
        sources=[batch.sources[i] for i in kept],
    )
