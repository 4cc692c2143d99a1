"""What the sink loop hands a store: a batch of decoded events with the offsets it
reaches, the `Store` protocol every store implements, and `StoreLost`, which a store
raises when it no longer holds what the sink wrote."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from topics.schema import Result


class StoreLost(Exception):
    """The store no longer holds what this sink wrote to these partitions (a Redis that
    was flushed or restarted empty): nothing of the batch was written for them."""

    def __init__(self, partitions: list[int]) -> None:
        super().__init__(f"the store lost partitions {partitions}")
        self.partitions = partitions


@dataclass
class Batch:
    """Decoded events of one poll, in partition order, and where each partition ends."""

    topic: str
    events: list[tuple[int, Result]] = field(default_factory=list)  # (shard, result)
    # The events topic offset of each event (same order): what a dead letter names.
    sources: list[int] = field(default_factory=list)
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset
    # partition -> the offset the store should hold before this batch (the previous
    # batch's end): what a store that keeps offsets checks to notice it lost its data.
    start: dict[int, int] = field(default_factory=dict)

    @property
    def entries(self) -> int:
        return sum(len(r.entries) for _, r in self.events)


class Store(Protocol):
    name: str
    # Exceptions that mean "the store is unreachable right now": retried.
    unavailable: tuple[type[BaseException], ...]

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def offsets(self, topic: str) -> dict[int, int]:
        """The store's own next offsets per partition (absent: from the beginning)."""
        ...

    async def write(self, batch: Batch) -> None: ...


def no_content_errors(error: BaseException) -> bool:
    """For a store none of whose errors is caused by an event's content."""
    return False


def one_line(error: BaseException) -> str:
    """A store's error as one line, named by its type: what a dead letter says."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
