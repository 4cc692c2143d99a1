"""`Prefer: wait=N`: hand each request the result event of the command it produced.

Every ingress process reads the whole events topic from the end (no consumer group:
each process must see every partition, because the result of its own command may be on
any of them) and wakes the requests waiting in this process only. A waiter registers
before its command is produced, and the reader's position is fixed at start, so a
result can never come before the waiter that expects it. Records whose key (the
account) nobody here waits on are skipped without decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from topics.codec import decode_result
from topics.schema import Result, source, source_in

log = logging.getLogger(__name__)


class Waiter:
    """One request waiting for the result of the record it produced. Until the broker's
    acknowledgement says which record that is, results with its command_id are kept;
    then only the result whose source header names that record counts (a command_id
    sent twice has two results, and a retry must not get the first one's)."""

    def __init__(self, account: str, command_id: str) -> None:
        self.account = account
        self.command_id = command_id
        self.future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.source: bytes | None = None
        self.early: list[tuple[bytes | None, Result]] = []

    def produced(self, partition: int, offset: int) -> None:
        self.source = source(partition, offset)
        for found, result in self.early:
            self.offer(found, result)
        self.early.clear()

    def offer(self, source: bytes | None, result: Result) -> None:
        """A result of this waiter's command_id, and the record it answers."""
        if self.future.done():
            return
        if self.source is None:
            self.early.append((source, result))
        elif source == self.source:
            self.future.set_result(result)


class ResultWaiter:
    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.topic = topic
        self.partitions = [TopicPartition(topic, p) for p in range(partitions)]
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="latest",
        )
        # account -> command_id -> the requests waiting for that command's result
        self._waiting: dict[bytes, dict[str, list[Waiter]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.assign(self.partitions)
        await self.consumer.seek_to_end(*self.partitions)
        for tp in self.partitions:
            await self.consumer.position(tp)
        self._task = asyncio.create_task(self._read(), name="result-waiter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()

    def expect(self, account: str, command_id: str) -> Waiter:
        """Register interest before producing; call `produced` with the record's place
        once acknowledged, await `future` with a timeout, then `forget` it."""
        waiter = Waiter(account, command_id)
        by_id = self._waiting.setdefault(account.encode(), {})
        by_id.setdefault(command_id, []).append(waiter)
        return waiter

    def forget(self, waiter: Waiter) -> None:
        key = waiter.account.encode()
        by_id = self._waiting.get(key)
        if by_id is None:
            return
        waiters = by_id.get(waiter.command_id, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            by_id.pop(waiter.command_id, None)
        if not by_id:
            del self._waiting[key]

    async def _read(self) -> None:
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=200, max_records=5000)
            except Exception:
                # The consumer reconnects by itself; waiters time out meanwhile.
                log.warning("reading results failed; retrying", exc_info=True)
                await asyncio.sleep(1)
                continue
            waiting = self._waiting
            for records in batches.values():
                for record in records:
                    by_id = waiting.get(record.key) if record.key is not None else None
                    if not by_id:
                        continue
                    try:
                        result = decode_result(record.value)
                    except msgspec.MsgspecError:
                        continue
                    waiters = by_id.get(result.command_id)
                    if not waiters:
                        continue
                    found = source_in(record.headers)
                    for waiter in waiters:
                        waiter.offer(found, result)
