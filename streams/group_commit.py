"""The two Kafka requests the engine's group fencing needs and aiokafka 0.14 cannot send.

Fencing by the group (KIP-447, what Kafka Streams calls exactly_once_v2; see
`streams.ownership`): one transactional producer per worker, and a transaction's consumed
offsets committed *with the member's group generation*, so that the group coordinator
refuses them (ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID) from a worker
the group has moved past, and the worker aborts the transaction. A new owner then reads
the shard's offsets with `require_stable`, which waits while a transaction that committed
offsets for them is still open. aiokafka sends TxnOffsetCommit v0 (no generation) and
OffsetFetch up to v3 (no require_stable), so both are written here from Kafka's message
definitions (clients/src/main/resources/common/message/TxnOffsetCommitRequest.json, v3,
and OffsetFetchRequest.json, v7; both flexible versions) with aiokafka's own protocol
types. `tests/integration/test_group_commit.py` sends both to the real broker, which
parses them and answers as the fencing needs (refusals, waits, offsets).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, TypeAlias

import aiokafka.errors as errors
from aiokafka.producer.sender import TxnOffsetCommitHandler
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)
from aiokafka.structs import TopicPartition

from streams import kafka_internals
from streams.kafka_internals import GroupMember

log = logging.getLogger(__name__)

# Error codes aiokafka has no class for.
FENCED_INSTANCE_ID = 82
UNSTABLE_OFFSET_COMMIT = 88
# The v0 answer's shape aiokafka's handler reads (made once: a namedtuple class built per
# transaction was 2% of a paced worker's samples at 64 partitions).
_Legacy = collections.namedtuple("_Legacy", "errors")
# What the coordinator answers a member the group has moved past (or one that is being
# moved): the transaction must be aborted, and the member rejoin.
_STALE_MEMBER = {
    errors.IllegalGenerationError.errno,
    errors.UnknownMemberIdError.errno,
    errors.RebalanceInProgressError.errno,
    FENCED_INSTANCE_ID,
}


class StaleMember(errors.KafkaError):  # type: ignore[misc]
    """The group coordinator refused a transaction's offsets: the member's generation is
    not the group's (the group moved its shards, or is moving them). The transaction is
    to be aborted; nothing of it becomes visible."""


def _per_topic(*partition_fields: tuple[str, Any]) -> tuple[str, CompactArray]:
    """The `topics` field these messages share: per topic its name and its partitions,
    each partition `partition_fields` (and, as each level of a flexible message, tagged
    fields)."""
    return (
        "topics",
        CompactArray(
            ("name", CompactString("utf-8")),
            ("partitions", CompactArray(*partition_fields, ("tags", TaggedFields))),
            ("tags", TaggedFields),
        ),
    )


# TxnOffsetCommit v3 ----------------------------------------------------------------------


class TxnOffsetCommitResponse_v3(Response):  # type: ignore[misc]
    API_KEY = 28
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        _per_topic(("partition_index", Int32), ("error_code", Int16)),
        ("tags", TaggedFields),
    )


class TxnOffsetCommitRequest_v3(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 28
    API_VERSION = 3
    RESPONSE_TYPE = TxnOffsetCommitResponse_v3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("group_id", CompactString("utf-8")),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", CompactString("utf-8")),
        ("group_instance_id", CompactString("utf-8")),
        _per_topic(
            ("partition_index", Int32),
            ("committed_offset", Int64),
            ("committed_leader_epoch", Int32),
            ("committed_metadata", CompactString("utf-8")),
        ),
        ("tags", TaggedFields),
    )


class TxnOffsetCommitRequest(Request[TxnOffsetCommitRequest_v3]):  # type: ignore[misc]
    API_KEY = 28

    def __init__(self, **fields: Any) -> None:
        self._fields = fields

    def build(
        self, request_struct_class: type[TxnOffsetCommitRequest_v3]
    ) -> TxnOffsetCommitRequest_v3:
        return request_struct_class(**self._fields)


def txn_offset_commit(
    *,
    transactional_id: str,
    group_id: str,
    producer_id: int,
    producer_epoch: int,
    member: GroupMember,
    offsets: dict[TopicPartition, int],
) -> TxnOffsetCommitRequest:
    by_topic: dict[str, list[tuple[int, int, int, str, dict[int, bytes]]]] = (
        collections.defaultdict(list)
    )
    for tp, offset in sorted(offsets.items()):
        by_topic[tp.topic].append((tp.partition, offset, -1, "", {}))
    return TxnOffsetCommitRequest(
        transactional_id=transactional_id,
        group_id=group_id,
        producer_id=producer_id,
        producer_epoch=producer_epoch,
        generation_id=member.generation,
        member_id=member.member_id,
        group_instance_id=member.instance_id,
        topics=[(topic, parts, {}) for topic, parts in by_topic.items()],
        tags={},
    )


class MemberTxnOffsetCommitHandler(TxnOffsetCommitHandler):  # type: ignore[misc]
    """aiokafka's TxnOffsetCommit handler, sending v3 with the member's generation. A stale
    member's refusal fails the transaction, to be aborted (`kafka_internals.
    fail_transaction`: aiokafka's own way would leave it open on the broker), instead of
    ending the producer's sender, which is what aiokafka does with an error it does not
    know."""

    def __init__(self, sender: Any, offsets: Any, group_id: str, member: GroupMember) -> None:
        super().__init__(sender, offsets, group_id)
        self._member = member

    def create_request(self) -> TxnOffsetCommitRequest:
        txn_manager = self._sender._txn_manager
        return txn_offset_commit(
            transactional_id=txn_manager.transactional_id,
            group_id=self._group_id,
            producer_id=txn_manager.producer_id,
            producer_epoch=txn_manager.producer_epoch,
            member=self._member,
            offsets={tp: meta.offset for tp, meta in self._offsets.items()},
        )

    def handle_response(self, resp: Any) -> float | None:
        for _, partitions, _ in resp.topics:
            for _, code, _ in partitions:
                if code in _STALE_MEMBER:
                    why = errors.for_code(code).__name__
                    error = StaleMember(
                        f"the group refused the transaction's offsets ({why}, code {code})"
                        f" for generation {self._member.generation}"
                    )
                    kafka_internals.fail_transaction(self._sender, error)
                    return None
        # Everything else exactly as aiokafka handles it, in the shape its v0 answer has.
        legacy = _Legacy(
            [(name, [(p, code) for p, code, _ in parts]) for name, parts, _ in resp.topics]
        )
        result: float | None = super().handle_response(legacy)
        return result


class MemberOffsets:
    """Installed on a worker's transactional producer: its transactions' offsets are sent
    as `member` (set before each transaction begins), the generation checked."""

    def __init__(self, producer: Any) -> None:
        self.member: GroupMember | None = None
        kafka_internals.commit_offsets_with(producer, self._handler)

    def _handler(self, sender: Any, offsets: Any, group_id: str) -> MemberTxnOffsetCommitHandler:
        assert self.member is not None, "a transaction's offsets sent before its member was set"
        return MemberTxnOffsetCommitHandler(sender, offsets, group_id, self.member)


# OffsetFetch v7 --------------------------------------------------------------------------


class OffsetFetchResponse_v7(Response):  # type: ignore[misc]
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        _per_topic(
            ("partition_index", Int32),
            ("committed_offset", Int64),
            ("committed_leader_epoch", Int32),
            ("metadata", CompactString("utf-8")),
            ("error_code", Int16),
        ),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class OffsetFetchRequest_v7(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 9
    API_VERSION = 7
    RESPONSE_TYPE = OffsetFetchResponse_v7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("partition_indexes", CompactArray(Int32)),
                ("tags", TaggedFields),
            ),
        ),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


OffsetFetchStruct: TypeAlias = OffsetFetchRequest_v7


class OffsetFetchRequest(Request[OffsetFetchStruct]):  # type: ignore[misc]
    API_KEY = 9

    def __init__(self, group_id: str, tps: list[TopicPartition]) -> None:
        by_topic: dict[str, list[int]] = collections.defaultdict(list)
        for tp in sorted(tps):
            by_topic[tp.topic].append(tp.partition)
        self._fields = {
            "group_id": group_id,
            "topics": [(topic, parts, {}) for topic, parts in by_topic.items()],
            "require_stable": True,
            "tags": {},
        }

    def build(self, request_struct_class: type[OffsetFetchStruct]) -> OffsetFetchStruct:
        return request_struct_class(**self._fields)


class UnstableOffsets(errors.KafkaTimeoutError):  # type: ignore[misc]
    """A transaction that committed offsets for these partitions stayed open past the wait."""


stable_backoff_s = 0.05


async def stable_committed(
    consumer: Any, group_id: str, tps: list[TopicPartition], *, timeout_s: float
) -> dict[TopicPartition, int | None]:
    """The group's committed offsets of `tps` (None where none is), once no open transaction
    holds offsets for them (`require_stable`): what a shard's previous owner committed is
    final when this returns. Waits while the broker answers UNSTABLE_OFFSET_COMMIT, up to
    `timeout_s` (a transaction is aborted by its coordinator after its timeout, so a longer
    wait means something else is wrong); raises UnstableOffsets then. Reads the consumer's
    group coordinator through `streams.kafka_internals`."""
    if not tps:
        return {}
    deadline = time.monotonic() + timeout_s
    while True:
        node_id = await kafka_internals.group_coordinator(consumer)
        response = await kafka_internals.client(consumer).send(
            node_id, OffsetFetchRequest(group_id, tps)
        )
        codes = {response.error_code} | {
            code for _, parts, _ in response.topics for _, _, _, _, code, _ in parts
        }
        codes.discard(0)
        if not codes:
            found = {
                TopicPartition(name, p): (offset if offset >= 0 else None)
                for name, parts, _ in response.topics
                for p, offset, _, _, _, _ in parts
            }
            return {tp: found.get(tp) for tp in tps}
        retriable = {
            UNSTABLE_OFFSET_COMMIT,
            errors.CoordinatorLoadInProgressError.errno,
            errors.CoordinatorNotAvailableError.errno,
            errors.NotCoordinatorError.errno,
        }
        if not codes <= retriable:
            raise errors.for_code(max(codes - retriable))(f"offset fetch for {group_id}")
        if codes - {UNSTABLE_OFFSET_COMMIT}:
            kafka_internals.coordinator_dead(consumer)
        if time.monotonic() >= deadline:
            raise UnstableOffsets(f"offsets of {sorted(tps)} still unstable after {timeout_s}s")
        await asyncio.sleep(stable_backoff_s)
