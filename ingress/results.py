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
from topics.schema import Result

log = logging.getLogger(__name__)


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
        # account -> command_id -> futures waiting for that command's result
        self._waiting: dict[bytes, dict[str, list[asyncio.Future[Result]]]] = {}
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

    def expect(self, account: str, command_id: str) -> asyncio.Future[Result]:
        """Register interest before producing; await the future (with a timeout),
        then call `forget` whatever happened."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        by_id = self._waiting.setdefault(account.encode(), {})
        by_id.setdefault(command_id, []).append(future)
        return future

    def forget(self, account: str, command_id: str, future: asyncio.Future[Result]) -> None:
        key = account.encode()
        by_id = self._waiting.get(key)
        if by_id is None:
            return
        futures = by_id.get(command_id, [])
        if future in futures:
            futures.remove(future)
        if not futures:
            by_id.pop(command_id, None)
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
                    for future in by_id.get(result.command_id, ()):
                        if not future.done():
                            future.set_result(result)
