"""Deciding one consumed record: what it becomes in the outputs of its shard's batch.

A client command or an internal credit is decided by `ledger.apply` against the shard's
store and its result (and the internal commands it emits) appended to the batch's
outputs; a record on the wrong partition is forwarded to its account's partition; an
undecodable one is dead-lettered; an invalid one is rejected without touching state. A
record that made its batch fail even alone is answered without being decided
(`answer_alone`). Nothing here talks to Kafka: the outputs are sent by the batch's
transaction (`streams.transaction`).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError

from streams import ledger
from streams.store import ShardStore
from topics import limits
from topics.codec import Invalid, Undecodable, dead_letter, decode_command, encode
from topics.schema import (
    SOURCE_HEADER,
    Command,
    Hold,
    Reason,
    Result,
    Status,
    kind_of,
    source,
    source_in,
)
from topics.shard import shard_of
from topics.specs import Topics

log = logging.getLogger(__name__)

# (topic, key, value, partition, headers)
Output = tuple[str, bytes | None, bytes | None, int, list[tuple[str, bytes]] | None]
# (expires_at_ms, account, hold_id) of an open hold with an expiry
Expiring = tuple[int, str, str]


class Records:
    """Decides records into outputs for one worker's shards (see the module's docstring)."""

    def __init__(
        self,
        topics: Topics,
        partitions: int,
        counts: Counter[str],
        watch: Callable[[Expiring], None],
    ) -> None:
        self.topics = topics
        self.partitions = partitions
        # Asked per record: looked up once.
        self._internal = topics.internal.name
        self._events = topics.events.name
        self.counts = counts
        # Told of every hold with an expiry that a batch opens (see `streams.timers`).
        self.watch = watch

    def handle(
        self, p: int, store: ShardStore, record: Any, now_ms: int, out: list[Output]
    ) -> None:
        """Decide one record of shard p's commands or internal partition at `now_ms`."""
        internal = record.topic == self._internal
        decoded = decode_command(record.value or b"", internal=internal)
        if isinstance(decoded, Undecodable):
            self.dead_letter_of(p, record, decoded.reason, now_ms, out)
            return
        if isinstance(decoded, Invalid):
            outcome = ledger.reject_invalid(decoded, now_ms)
            self.emit(p, outcome, out, _source(record, internal))
            return
        owner = shard_of(decoded.account, self.partitions)
        if owner != p:
            # Placed by a partitioner other than murmur2 (kcat's CRC32, say): apply it
            # only on its account's shard, or one balance would live in two.
            # The copy carries the source of the record the client produced, so that
            # its result names that record (see `_source`). Always this record's own:
            # a record on a wrong partition is never a copy of ours (copies land on
            # their owner), so a tally-source header it carries is a producer's
            # invention and is not passed on.
            self.counts["forwarded"] += 1
            own = None if internal else [(SOURCE_HEADER, source(record.partition, record.offset))]
            out.append(
                (record.topic, decoded.account.encode(), record.value, owner, own)
            )  # fmt: skip
            return
        try:
            self.decide(p, store, decoded, now_ms, out, _source(record, internal))
        except Exception as exc:
            # A bug in the rules must not stop the shard: the record is parked with the
            # error, nothing of it was staged, and the next record goes on.
            log.exception("ledger failed on %s", decoded.command_id)
            self.dead_letter_of(p, record, f"engine error: {exc!r}", now_ms, out)

    def decide(
        self,
        p: int,
        store: ShardStore,
        command: Command,
        now_ms: int,
        out: list[Output],
        source: list[tuple[str, bytes]] | None = None,
    ) -> None:
        outcome = ledger.apply(store, command, now_ms)
        store.commit(outcome)
        self.emit(p, outcome, out, source)
        if isinstance(command, Hold) and command.expires_at_ms is not None:
            self.watch((command.expires_at_ms, command.account, command.hold_id))

    def emit(
        self,
        p: int,
        outcome: ledger.Outcome,
        out: list[Output],
        source: list[tuple[str, bytes]] | None = None,
    ) -> None:
        for emitted in outcome.emits:
            shard = shard_of(emitted.account, self.partitions)
            out.append((self._internal, emitted.account.encode(), encode(emitted), shard, None))
        result = outcome.result
        self.counts[_STATUS[result.status]] += 1
        out.append((self._events, result.account.encode(), encode(result), p, source))

    def answer_alone(
        self, p: int, record: Any, error: BaseException, now_ms: int, out: list[Output]
    ) -> None:
        """Answer the record that made its batch fail even alone, without deciding it
        (nothing of it is applied or remembered): a client command whose outcome would
        not fit in the records the engine writes gets `rejected` `record_too_large`;
        anything else (an internal command, a record that broke the engine) a dead letter
        naming the error, and without the record's bytes if it was the letter that was
        too large (a dead-letter topic with a small max.message.bytes)."""
        internal = record.topic == self.topics.internal.name
        try:
            decoded = decode_command(record.value or b"", internal=internal)
        except Exception:
            decoded = Undecodable("undecodable")
        if internal or isinstance(decoded, Undecodable) or not too_large(error):
            reason = f"isolated: {error!r}"
            keep = 0 if too_large(error) else limits.DEAD_LETTER_RAW_BYTES_MAX
            self.dead_letter_of(p, record, reason, now_ms, out, keep=keep)
            return
        result = Result(
            command_id=decoded.command_id,
            account=decoded.account,
            kind=decoded.kind if isinstance(decoded, Invalid) else kind_of(decoded),
            status=Status.REJECTED,
            reason=Reason.RECORD_TOO_LARGE,
            detail=f"its outcome cannot be written: {error!r}"[: limits.DETAIL_LEN_MAX],
            at_ms=now_ms,
        )
        self.counts[result.status.value] += 1
        out.append(
            (self.topics.events.name, result.account.encode(), encode(result), p,
             _source(record, internal))
        )  # fmt: skip

    def dead_letter_of(
        self,
        p: int,
        record: Any,
        reason: str,
        now_ms: int,
        out: list[Output],
        *,
        keep: int = limits.DEAD_LETTER_RAW_BYTES_MAX,
    ) -> None:
        self.counts["dead_lettered"] += 1
        letter = dead_letter(
            reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            raw=record.value or b"",
            at_ms=now_ms,
            keep=keep,
        )
        out.append((self.topics.dead_letter.name, None, encode(letter), p, None))


# Each status's name, as `counts` keys it (a dict lookup: the enum's `.value` is a
# descriptor call, made for every result).
_STATUS = {status: status.value for status in Status}
_SOURCE_VALUE = re.compile(rb"[0-9]{1,10}:[0-9]{1,19}")


def _source(record: Any, internal: bool) -> list[tuple[str, bytes]] | None:
    """The header that ties a client command's result to the record it answers (see
    `topics.schema.SOURCE_HEADER`): the record itself, or, for a copy the engine
    forwarded from a wrong partition, the record the client produced (which the copy's
    own header names). A header is only taken as such when it is well formed and names
    another partition, as a forwarded copy's always does: a producer cannot make a
    record stand for one on its own partition (where the ingress's records are)."""
    if internal:
        return None
    forwarded = source_in(record.headers)
    if (
        forwarded is not None
        and _SOURCE_VALUE.fullmatch(forwarded)
        and int(forwarded.partition(b":")[0]) != record.partition
    ):
        return [(SOURCE_HEADER, forwarded)]
    return [(SOURCE_HEADER, source(record.partition, record.offset))]


def check_sizes(out: list[Output], changelog: Iterable[tuple[bytes, bytes | None]]) -> None:
    """Refuse a batch that would write a record over limits.OUTPUT_BYTES_MAX, before
    anything is sent (the broker would refuse it, or aiokafka before it)."""
    for topic, key, value, _, headers in out:
        size = len(key or b"") + len(value or b"")
        for name, header in headers or ():  # a loop, not sum(): no generator per record
            size += len(name) + len(header)
        if size > limits.OUTPUT_BYTES_MAX:
            raise RecordTooLargeError(f"a record of {size} bytes for {topic}")
    for key, value in changelog:
        if len(key) + len(value or b"") > limits.OUTPUT_BYTES_MAX:
            raise RecordTooLargeError(f"a changelog value of {len(value or b'')} bytes")


def too_large(error: BaseException) -> bool:
    """Whether a record failed for the size of what it would write."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(
            seen, (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
