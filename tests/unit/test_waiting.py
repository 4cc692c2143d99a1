"""The tests' one polling helper (`tests.waiting.until`) returns once its check holds,
plain or async, and fails naming what it waited for when it never does."""

from __future__ import annotations

import pytest

from tests.waiting import until


async def test_until_returns_once_the_check_holds_and_fails_naming_what_it_waited_for() -> None:
    calls = []

    async def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    await until(third_time, timeout_s=5, what="three calls", every_s=0.01)
    assert len(calls) == 3
    await until(lambda: True, timeout_s=0, what="at once")
    with pytest.raises(AssertionError, match=r"not within 0\.05s: the tail"):
        await until(lambda: False, timeout_s=0.05, what=lambda: "the tail", every_s=0.01)
