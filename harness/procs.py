"""Run real `tally engine` worker processes on topics of their own: for the benchmark,
the fault harness and the tests."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from core.settings import Settings, child_env
from harness.errors import HarnessError
from streams.state import BalanceState
from topics.codec import encode
from topics.producer import durable_producer
from topics.specs import Topics, topics_for

ROOT = Path(__file__).resolve().parents[1]
ready_timeout_s = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EngineError(HarnessError):
    """A child process exited or did not become ready."""


class _Child:
    """A `tally` subcommand as a child process, logging to a file, ready once its
    /readyz answers 200."""

    what = "engine"
    args: tuple[str, ...] = ()
    port: int
    log_path: Path
    env: dict[str, str]

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        # Where this start's lines begin in the log (a restart appends to the same file).
        self.log_start = 0

    async def start(self, *, wait: bool = True) -> None:
        """Start the process; with `wait`, return once /readyz answers 200."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.log_start = log.seek(0, 2)
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(),
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
        log.close()
        if wait:
            try:
                await self.wait_ready()
            except BaseException:
                # Not ready (or cancelled): a caller's `finally` may never have been
                # entered, so this process must not outlive the failed start.
                await self.kill()
                raise

    def command(self) -> list[str]:
        """The child's argv: `tally WHAT ARGS` through this interpreter."""
        return [sys.executable, "-m", "tally.cli", self.what, *self.args]

    async def wait_ready(self) -> None:
        """Ready once /readyz says so (for the engine: partitions assigned and
        recovered; for the ingress: Kafka, PostgreSQL and Redis reachable)."""
        deadline = asyncio.get_running_loop().time() + ready_timeout_s
        url = f"http://127.0.0.1:{self.port}/readyz"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            while asyncio.get_running_loop().time() < deadline:
                if self.proc is None:
                    raise EngineError(f"{self.what} was not started")
                if self.proc.returncode is not None:
                    raise EngineError(f"{self.what} exited {self.proc.returncode}:\n{self.tail()}")
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.2)
        raise EngineError(f"{self.what} not ready in {ready_timeout_s}s:\n{self.tail()}")

    async def readyz(self) -> dict[str, Any]:
        """The /readyz body."""
        url = f"http://127.0.0.1:{self.port}/readyz"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            body: dict[str, Any] = await response.json(content_type=None)
        return body

    def tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def log_since_start(self) -> str:
        """What the process logged since its last start (not an earlier start's lines)."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    async def stop(self) -> int:
        """SIGTERM, the clean way; returns the exit code (0 when it never started)."""
        if self.proc is None:
            return 0
        return await self._signal(signal.SIGTERM)

    async def kill(self) -> int:
        """SIGKILL: no chance to commit or clean up anything."""
        return await self._signal(signal.SIGKILL)

    async def _signal(self, sig: int) -> int:
        if self.proc is None:
            raise EngineError(f"{self.what} was not started")
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return int(self.proc.returncode or 0)


class EngineProcess(_Child):
    """One engine worker as a child process, with its own prefix, state dir and port."""

    def __init__(
        self,
        settings: Settings,
        *,
        prefix: str,
        data_dir: Path,
        guarantee: str = "exactly_once",
        partitions: int = 4,
        log_level: str = "INFO",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.prefix = prefix
        self.data_dir = data_dir.resolve()
        self.port = free_port()
        self.partitions = partitions
        self.topics: Topics = topics_for(prefix, partitions)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.env = child_env(
            msgspec.structs.replace(
                settings,
                topic_prefix=prefix,
                partitions=partitions,
                data_dir=str(self.data_dir),
                web_port=self.port,
                processing_guarantee=guarantee,
                log_level=log_level,
            )
        )
        self.env.update(extra_env or {})

    async def balances(self, account: str) -> dict[str, BalanceState]:
        """The strongly consistent read: the owning worker's table view."""
        url = f"http://127.0.0.1:{self.port}/balances/{account}/"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            if response.status != 200:
                raise EngineError(f"GET {url}: {response.status} {await response.text()}")
            body: dict[str, Any] = await response.json()
        return {
            asset: BalanceState(b["available"], b["held"], b["seq"])
            for asset, b in body["balances"].items()
        }


class IngressProcess(_Child):
    """`tally ingress` as a child process on a free port, for a deployment `prefix`;
    with `processes` > 1, `tally ingress --processes N` (N processes on the port)."""

    what = "ingress"

    def __init__(
        self,
        settings: Settings,
        *,
        prefix: str,
        log_path: Path,
        partitions: int = 4,
        keys: dict[str, str] | None = None,
        port: int | None = None,
        processes: int = 1,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.processes = processes
        if processes > 1:
            self.args = ("--processes", str(processes))
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = child_env(
            msgspec.structs.replace(
                settings,
                topic_prefix=prefix,
                partitions=partitions,
                ingress_port=self.port,
                ingress_keys=",".join(f"{k}:{v}" for k, v in (keys or {}).items()),
                **overrides,
            )
        )

    async def wait_ready(self) -> None:
        """/readyz answers from the first process that listens; with several, also wait
        until each has logged that it listens (SO_REUSEPORT spreads connections only
        over those that do)."""
        await super().wait_ready()
        deadline = asyncio.get_running_loop().time() + ready_timeout_s
        while self.log_since_start().count("ingress: listening on") < self.processes:
            if asyncio.get_running_loop().time() > deadline:
                raise EngineError(
                    f"{self.processes} ingress processes did not all listen in "
                    f"{ready_timeout_s:.0f}s:\n{self.tail()}"
                )
            await asyncio.sleep(0.1)


class SinkProcess(_Child):
    """`tally sink TARGET` as a child process with its web server on a free port, for a
    deployment `prefix`; ready once its /readyz answers 200 (store up, partitions
    assigned)."""

    what = "sink"

    def __init__(
        self,
        settings: Settings,
        target: str,
        *,
        prefix: str,
        log_path: Path,
        partitions: int = 4,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.args = (target,)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = child_env(
            msgspec.structs.replace(
                settings,
                topic_prefix=prefix,
                partitions=partitions,
                **{f"sink_{target}_web_port": self.port},
                **overrides,
            )
        )


class NotifyProcess(_Child):
    """`tally notify` as a child process for a deployment `prefix`, web on a free port."""

    what = "notify"

    def __init__(
        self, settings: Settings, *, prefix: str, log_path: Path, partitions: int = 4,
        **overrides: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        self.port = free_port()
        self.log_path = log_path
        self.env = child_env(
            msgspec.structs.replace(
                settings, topic_prefix=prefix, partitions=partitions,
                notify_port=self.port, **overrides,
            )
        )  # fmt: skip


async def produce(
    bootstrap: str, topic: str, records: list[tuple[str, bytes, int | None]]
) -> float:
    """Produce (key, value, partition-or-None) records, acks=all, and return records/s.
    Sent without waiting for each acknowledgement; the idempotent producer keeps each
    partition's records in the order given. None places a record by murmur2 of its key
    (the account's shard)."""
    producer = durable_producer(
        bootstrap,
        linger_ms=5,
        max_batch_size=512 * 1024,
    )
    await producer.start()
    started = time.perf_counter()
    try:
        sent = [
            await producer.send(topic, key=key.encode(), value=value, partition=partition)
            for key, value, partition in records
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return len(records) / max(time.perf_counter() - started, 1e-9)


async def trickle(
    bootstrap: str,
    topic: str,
    records: list[tuple[str, bytes, int | None]],
    *,
    chunks: int = 20,
    pause_s: float = 0.1,
) -> None:
    """Produce records in `chunks` slices with a pause between them: a load that is
    still arriving while a fault test kills or stops something."""
    size = max(1, -(-len(records) // chunks))
    for start in range(0, len(records), size):
        await produce(bootstrap, topic, records[start : start + size])
        await asyncio.sleep(pause_s)


def command(c: Any) -> tuple[str, bytes, None]:
    return (c.account, encode(c), None)


async def run_cli(settings: Settings, *args: str, timeout_s: float = 120.0) -> tuple[int, str, str]:
    """`tally ARGS` as a child process with `settings` as its environment: exit code,
    stdout, stderr. (Killed after `timeout_s`.)"""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tally.cli", *args,
        cwd=ROOT, env=child_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return int(proc.returncode or 0), out.decode(), err.decode()
