"""The group fencing's three checks against the real broker (`streams.group_commit`,
`streams.recovery`): a transaction whose offsets come from a member the group has moved
past is refused before it commits, and nothing of it is visible; a new owner's offset
read waits while a transaction that sent offsets for them is open; and a new owner's
changelog read waits while a transaction is open on the partition. Each is what keeps a
zombie worker from committing for, or being missed by, the worker that took its shards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from core.settings import Settings
from streams import kafka_internals, recovery
from streams.group_commit import MemberOffsets, StaleMember, stable_committed
from streams.kafka_internals import GroupMember
from topics.admin import delete_topics, ensure_topics
from topics.names import replicas
from topics.specs import TopicSpec


@contextlib.asynccontextmanager
async def _setup(
    settings: Settings, unique: str
) -> AsyncIterator[tuple[str, str, AIOKafkaConsumer, AIOKafkaProducer, MemberOffsets]]:
    """A topic, a consumer that joined group `g-<unique>` on it, and a transactional
    producer whose offsets go as a group member."""
    topic, group = f"gc-{unique}", f"g-{unique}"
    spec = TopicSpec(
        name=topic,
        partitions=2,
        cleanup_policy="delete",
        retention_ms=-1,
        replicas=replicas(settings),
    )
    await ensure_topics(settings.kafka_bootstrap, [spec])
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group,
        group_instance_id=f"i-{unique}",
        enable_auto_commit=False,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        transactional_id=f"tx-{unique}",
        transaction_timeout_ms=10_000,
    )
    member = MemberOffsets(producer)
    await consumer.start()
    await producer.start()
    try:
        for _ in range(100):
            if consumer.assignment():
                break
            await consumer.getmany(timeout_ms=200)
        assert consumer.assignment(), "the consumer never joined its group"
        yield topic, group, consumer, producer, member
    finally:
        await producer.stop()
        await consumer.stop()
        await delete_topics(settings.kafka_bootstrap, [topic])


async def _visible(settings: Settings, topic: str) -> int:
    """How many records of `topic` partition 0 a read_committed reader sees."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, isolation_level="read_committed"
    )
    await reader.start()
    try:
        tp = TopicPartition(topic, 0)
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        seen = 0
        for _ in range(10):
            polled = await reader.getmany(tp, timeout_ms=300)
            seen += len(polled.get(tp, []))
        return seen
    finally:
        await reader.stop()


async def test_offsets_from_a_stale_generation_or_member_are_refused_and_nothing_commits(
    settings: Settings, unique: str
) -> None:
    async with _setup(settings, unique) as (topic, group, consumer, producer, member):
        me = kafka_internals.member(consumer)
        assert me is not None and me.instance_id == f"i-{unique}"
        tp = TopicPartition(topic, 0)
        stale = [
            GroupMember(me.generation + 1, me.member_id, me.instance_id),  # not the group's
            GroupMember(me.generation, "another-member", me.instance_id),  # instance fenced
            GroupMember(me.generation, "another-member", None),  # unknown member
        ]
        for i, who in enumerate(stale):
            member.member = who
            await producer.begin_transaction()
            await producer.send_and_wait(topic, b"zombie", partition=0)
            with pytest.raises(StaleMember):
                await producer.send_offsets_to_transaction({tp: 100 + i}, group)
            await producer.abort_transaction()
        # The producer goes on; the member's own generation is accepted.
        member.member = me
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"owner", partition=0)
        await producer.send_offsets_to_transaction({tp: 7}, group)
        await producer.commit_transaction()
        assert await stable_committed(consumer, group, [tp], timeout_s=10) == {tp: 7}
        assert await _visible(settings, topic) == 1  # the owner's record, none of the zombie's


async def test_a_new_owners_offset_read_waits_for_an_open_transaction_with_offsets(
    settings: Settings, unique: str
) -> None:
    async with _setup(settings, unique) as (topic, group, consumer, producer, member):
        tp, other = TopicPartition(topic, 0), TopicPartition(topic, 1)
        assert await stable_committed(consumer, group, [tp, other], timeout_s=10) == {
            tp: None,
            other: None,
        }
        member.member = kafka_internals.member(consumer)
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"x", partition=0)
        await producer.send_offsets_to_transaction({tp: 3}, group)
        read = asyncio.create_task(stable_committed(consumer, group, [tp], timeout_s=20))
        await asyncio.sleep(1.0)
        assert not read.done(), f"read {read.result()} while the transaction was open"
        # A partition the open transaction holds no offsets for is read at once.
        assert await stable_committed(consumer, group, [other], timeout_s=10) == {other: None}
        await producer.commit_transaction()
        assert await asyncio.wait_for(read, 20) == {tp: 3}


async def test_a_changelog_read_waits_while_a_transaction_is_open_on_the_partition(
    settings: Settings, unique: str
) -> None:
    async with _setup(settings, unique) as (topic, _, _, producer, _):
        tp = TopicPartition(topic, 0)
        restore = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, isolation_level="read_committed"
        )
        await restore.start()
        try:
            await producer.begin_transaction()
            await producer.send_and_wait(topic, b"a", partition=0)
            await producer.send_and_wait(topic, b"b", partition=0)
            settled = asyncio.create_task(
                recovery._settled(settings.kafka_bootstrap, restore, [tp], timeout_s=20)
            )
            await asyncio.sleep(1.0)
            assert not settled.done(), f"settled at {settled.result()} with a transaction open"
            await producer.commit_transaction()
            # Two records and the commit marker.
            assert await asyncio.wait_for(settled, 20) == {tp: 3}
            # And one that stays open past the wait is an error, not a short read.
            await producer.begin_transaction()
            await producer.send_and_wait(topic, b"c", partition=0)
            with pytest.raises(recovery.Unsettled):
                await recovery._settled(settings.kafka_bootstrap, restore, [tp], timeout_s=1)
            await producer.abort_transaction()
        finally:
            await restore.stop()
