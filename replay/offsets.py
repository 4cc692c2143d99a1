"""Where a replay files its offsets, and how it leaves the live sink's.

The Redis sink resumes from the progress it keeps in Redis, which the script
only ever moves forward: the replay's batches may raise it, never lower it, and
everything before it is in Redis whichever of the two wrote it. The PostgreSQL sink
resumes from `sink_offsets`, which its store writes in each batch's transaction; left
as they are, a replay's batches would move the live sink's offsets back to 0 and then
up again. So the replay's batches file their
offsets under `<topic>#replay` instead (its progress, removed at the end), and only a
replay that reached the end raises the live sink's offsets, in one statement, to at
least the end offsets taken at the start: `greatest(stored, end)`. They never move back,
so a live sink started afterwards neither rewrites what the replay wrote nor skips past
what it has not (everything before `end` is in the store now, and a sink that had gone
further keeps its own). An interrupted replay leaves them exactly as they were. (So
whoever empties the tables by hand empties sink_offsets with them: offsets left behind
would tell a sink started before the replay ends that rows are there that are not.)
"""

from __future__ import annotations

import dataclasses

from core.settings import Settings
from replay.checks import Plan
from sinks import pg
from sinks.runner import Batch, Store
from topics.names import schema_name

# Where a PostgreSQL replay files its batches' offsets in sink_offsets: `<topic>` + this.
offsets_aside_suffix = "#replay"

_OFFSETS_AT_LEAST = """
INSERT INTO sink_offsets (topic, partition, next_offset)
SELECT $1, * FROM unnest($2::int[], $3::bigint[])
ON CONFLICT (topic, partition) DO UPDATE
    SET next_offset = greatest(sink_offsets.next_offset, excluded.next_offset)
"""


class OffsetsAside:
    """A store whose batches file their offsets under another name than the topic's.

    PostgreSQL keys sink_offsets by a batch's topic; a replay's batches, renamed, keep
    their offsets (their progress) apart from the live sink's. The rows are the same."""

    def __init__(self, inner: Store, topic: str) -> None:
        self.inner = inner
        self.topic = topic
        self.name = inner.name
        self.unavailable = inner.unavailable

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def offsets(self, topic: str) -> dict[int, int]:
        return await self.inner.offsets(topic)

    async def write(self, batch: Batch) -> None:
        await self.inner.write(dataclasses.replace(batch, topic=self.topic))


async def settle_offsets(settings: Settings, plan: Plan, *, raise_to_end: bool) -> None:
    """Drop the replay's own progress rows; after a whole replay, raise the live sink's
    offsets to at least the end (see the module's docstring for why)."""
    conn = await pg.connect(settings.pg_dsn, schema_name(settings))
    try:
        async with conn.transaction():
            await conn.execute(
                "DELETE FROM sink_offsets WHERE topic = $1", plan.topic + offsets_aside_suffix
            )
            if raise_to_end:
                parts = sorted(plan.end.items())
                await conn.execute(
                    _OFFSETS_AT_LEAST, plan.topic, [p for p, _ in parts], [o for _, o in parts]
                )
    finally:
        await conn.close()
