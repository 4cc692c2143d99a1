"""A sink whose store is unreachable is not ready, and ready again when it is back:
the Redis sink reaches Redis through a TCP proxy of this test's own, which the test
closes and opens again (the shared Redis itself is never touched; the fault test
tests/fault/test_sink_web_faults.py stops the real PostgreSQL instead)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import msgspec

from core.settings import Settings
from harness.procs import SinkProcess, free_port
from sinks import verify
from topics.names import schema_name

PARTITIONS = 2


class Proxy:
    """Forwards 127.0.0.1:port to the upstream; `cut()` closes the listener and every
    connection through it, `restore()` listens again on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()

    async def restore(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for task in list(self.pipes):
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.pipes.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            self.pipes.discard(task)
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
            self.pipes.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


async def _status(url: str) -> tuple[int, dict[str, object]]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        return response.status, await response.json(content_type=None)


async def _until(url: str, status: int, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        got, body = await _status(url)
        if got == status or time.monotonic() > deadline:
            assert got == status, (got, body)
            return body
        await asyncio.sleep(0.3)


async def test_redis_sink_readyz_is_503_while_redis_is_unreachable(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    redis = urlparse(settings.redis_url)
    proxy = Proxy(redis.hostname or "127.0.0.1", redis.port or 6379)
    await proxy.restore()
    through = f"redis://127.0.0.1:{proxy.port}{redis.path or '/0'}"
    prefix = f"rdy-{unique}"
    sink = SinkProcess(settings, "redis", prefix=prefix, log_path=tmp_path / "sink.log",
                       partitions=PARTITIONS, redis_url=through)  # fmt: skip
    try:
        await sink.start()
        body = await _until(f"{sink.url}/readyz", 200, 30)
        assert body["checks"] == {"store": "ok", "consumer": "ok"}
        await proxy.cut()
        body = await _until(f"{sink.url}/readyz", 503, 30)
        checks = body["checks"]
        assert isinstance(checks, dict)
        assert checks["store"].startswith("unavailable"), body
        assert checks["consumer"] == "ok", body
        assert (await _status(f"{sink.url}/livez"))[0] == 200  # alive: a restart won't help
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{sink.url}/metrics") as response,
        ):
            text = await response.text()
        assert 'tally_sink_ready{target="redis"} 0.0' in text, text
        await proxy.restore()
        await _until(f"{sink.url}/readyz", 200, 60)
    finally:
        await sink.stop()
        await proxy.cut()
        local = msgspec.structs.replace(settings, topic_prefix=prefix, partitions=PARTITIONS)
        await verify.drop(local.pg_dsn, schema_name(local), local.redis_url, prefix)
