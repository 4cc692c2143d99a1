"""Matching a result event to the command record that produced it.

A command id can be sent more than once (a client's retry, an import run again) and each
record gets a result of its own (the first one decided, the others `duplicate`), so the
account and command id alone do not say which result answers which record. The engine
stamps every result with a `tally-source` header naming the record it answers (its
partition and offset on the commands topic, `topics.schema.source`), and the producer
learns its record's place from the broker's acknowledgement. A result can be read before
that acknowledgement is seen, so until the place is known the results with the record's
account and command id are kept aside; from then on, only the one whose header names the
record counts, once.

The one rule for everything that waits for its own results: the ingress's `Prefer: wait`
and `tally import`. Pure: the callers read the events topic and hand the results in.
"""

from __future__ import annotations

from collections.abc import Callable

from topics.schema import Result, source


class Awaited:
    """One produced record waiting for its result. `on_result` is called once, with the
    result that answers the record."""

    __slots__ = ("_correlator", "_on_result", "account", "command_id", "done", "early", "source")

    def __init__(
        self,
        correlator: Correlator,
        account: str,
        command_id: str,
        on_result: Callable[[Result], None],
    ) -> None:
        self._correlator = correlator
        self._on_result = on_result
        self.account = account
        self.command_id = command_id
        self.source: bytes | None = None
        self.early: list[tuple[bytes | None, Result]] = []
        self.done = False

    def produced(self, partition: int, offset: int) -> None:
        """The broker took the record at this place: a result kept for it counts now."""
        self.source = source(partition, offset)
        early, self.early = self.early, []
        for found, result in early:
            self.offer(found, result)

    def offer(self, found: bytes | None, result: Result) -> None:
        """A result with this record's account and command id, and the record its
        `tally-source` header names (None: no header)."""
        if self.done:
            return
        if self.source is None:
            self.early.append((found, result))
        elif found == self.source:
            self.done = True
            self._correlator.forget(self)
            self._on_result(result)


class Correlator:
    """The records produced and not answered yet, by account and command id."""

    def __init__(self) -> None:
        # account (as the events topic's record key) -> command id -> the records waiting
        self._waiting: dict[bytes, dict[str, list[Awaited]]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def expect(self, account: str, command_id: str, on_result: Callable[[Result], None]) -> Awaited:
        """Register a record before producing it (a result cannot then come first);
        tell the returned `Awaited` where the record went once the broker says so."""
        awaited = Awaited(self, account, command_id, on_result)
        by_id = self._waiting.setdefault(account.encode(), {})
        by_id.setdefault(command_id, []).append(awaited)
        self._count += 1
        return awaited

    def forget(self, awaited: Awaited) -> None:
        """Stop waiting (answered, given up, or never produced). Forgetting twice is
        harmless."""
        key = awaited.account.encode()
        by_id = self._waiting.get(key)
        waiting = by_id.get(awaited.command_id) if by_id is not None else None
        if by_id is None or waiting is None or awaited not in waiting:
            return
        waiting.remove(awaited)
        self._count -= 1
        if not waiting:
            del by_id[awaited.command_id]
        if not by_id:
            del self._waiting[key]

    def waits_on(self, account: bytes | None) -> bool:
        """Whether a record of this account (an events record's key) is waited for:
        the others need not be decoded."""
        return account is not None and account in self._waiting

    def awaits(self, account: str, command_id: str) -> bool:
        by_id = self._waiting.get(account.encode())
        return by_id is not None and command_id in by_id

    def offer(self, result: Result, found: bytes | None) -> None:
        """A result read from the events topic, with the record its `tally-source`
        header names."""
        by_id = self._waiting.get(result.account.encode())
        waiting = by_id.get(result.command_id) if by_id is not None else None
        for awaited in list(waiting or ()):
            awaited.offer(found, result)
