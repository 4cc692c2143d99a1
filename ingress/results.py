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
from topics.correlate import Correlator
from topics.schema import Result, source_in

log = logging.getLogger(__name__)


class Waiter:
    """One request waiting for the result of the record it produced: `future` resolves
    to the result whose `tally-source` header names that record (topics.correlate)."""

    __slots__ = ("awaited", "future")

    def __init__(self, correlator: Correlator, account: str, command_id: str) -> None:
        self.future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.awaited = correlator.expect(account, command_id, self._answered)

    def produced(self, partition: int, offset: int) -> None:
        self.awaited.produced(partition, offset)

    def _answered(self, result: Result) -> None:
        if not self.future.done():
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
        self._correlator = Correlator()
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
        return Waiter(self._correlator, account, command_id)

    def forget(self, waiter: Waiter) -> None:
        self._correlator.forget(waiter.awaited)

    async def _read(self) -> None:
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=200, max_records=5000)
            except Exception:
                # The consumer reconnects by itself; waiters time out meanwhile.
                log.warning("reading results failed; retrying", exc_info=True)
                await asyncio.sleep(1)
                continue
            correlator = self._correlator
            for records in batches.values():
                for record in records:
                    if not correlator.waits_on(record.key):
                        continue
                    try:
                        result = decode_result(record.value)
                    except msgspec.MsgspecError:
                        continue
                    correlator.offer(result, source_in(record.headers))
