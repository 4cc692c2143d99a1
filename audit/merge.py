"""Merging two key-sorted streams of pages (PostgreSQL's and the engine's) into one, a
page at a time, so that neither is ever held whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, TypeVar

L = TypeVar("L")
R = TypeVar("R")


def merge_step(
    left: Sequence[tuple[str, L]],
    right: Sequence[tuple[str, R]],
    left_done: bool,
    right_done: bool,
) -> tuple[list[tuple[str, L | None, R | None]], list[tuple[str, L]], list[tuple[str, R]]]:
    """Merge what can be merged now of two buffers of key-sorted (key, value) pairs.

    A key can be merged once neither stream can still deliver it: it is at most the
    last buffered key of every stream that has more pages to come. Returns the merged
    (key, left value or None, right value or None) triples in key order, and what is
    left of each buffer. A stream with more to come and an empty buffer blocks: fetch
    its next page first."""
    bounds = []
    for buffer, done in ((left, left_done), (right, right_done)):
        if not done:
            if not buffer:
                return [], list(left), list(right)
            bounds.append(buffer[-1][0])
    bound = min(bounds) if bounds else None
    out: list[tuple[str, L | None, R | None]] = []
    i = j = 0
    while i < len(left) or j < len(right):
        lk = left[i][0] if i < len(left) else None
        rk = right[j][0] if j < len(right) else None
        key = rk if lk is None else lk if rk is None else min(lk, rk)
        assert key is not None
        if bound is not None and key > bound:
            break
        lv: L | None = None
        rv: R | None = None
        if lk == key:
            lv = left[i][1]
            i += 1
        if rk == key:
            rv = right[j][1]
            j += 1
        out.append((key, lv, rv))
    return out, list(left[i:]), list(right[j:])


async def aligned(
    left: AsyncIterator[list[tuple[str, L]]], right: AsyncIterator[list[tuple[str, R]]]
) -> AsyncGenerator[list[tuple[str, L | None, R | None]], None]:
    """Two async streams of key-sorted pages, merged into pages of (key, left, right):
    every key of either stream once, in order, with what each stream has for it."""
    lbuf: list[tuple[str, L]] = []
    rbuf: list[tuple[str, R]] = []
    ldone = rdone = False
    lkey = rkey = ""
    while True:
        want_left = not lbuf and not ldone
        want_right = not rbuf and not rdone
        if want_left or want_right:
            lpage, rpage = await asyncio.gather(
                anext(left, None) if want_left else _none(),
                anext(right, None) if want_right else _none(),
            )
            if want_left:
                ldone, lbuf, lkey = _take(lpage, lkey, "left")
            if want_right:
                rdone, rbuf, rkey = _take(rpage, rkey, "right")
        out, lbuf, rbuf = merge_step(lbuf, rbuf, ldone, rdone)
        if out:
            yield out
        elif ldone and rdone:
            return


async def _none() -> None:
    return None


class OutOfOrder(ValueError):
    """A stream's keys did not strictly increase: a bug or a collation that is not "C"
    (it would read as keys missing on the other side)."""

    def __init__(self, side: str, key: str, last: str) -> None:
        super().__init__(f"keys out of order: {key!r} after {last!r}")
        self.side = side


def _take(page: list[tuple[str, L]] | None, last: str, side: str) -> tuple[bool, list[Any], str]:
    """(done, buffer, last key) after a page of one side."""
    if page is None:
        return True, [], last
    for key, _ in page:
        if key <= last:
            raise OutOfOrder(side, key, last)
        last = key
    return False, page, last
