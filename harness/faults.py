"""Break the local services on purpose and bring them back: the Kafka broker, the
PostgreSQL server and Redis, as `scripts/services.sh` runs them. For the fault tests and
the chaos harness; nothing here is used by a deployment.

Each helper finds the server that is actually running (its pid and its own state
directory) instead of assuming this checkout started it: a clean clone running against
services another checkout started must restart *that* broker, not start a second one on
empty data.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.procs import ROOT
from sinks import pg, redis_client


class FaultUnavailable(HarnessError):
    """This fault cannot be injected here (the service was not started by services.sh)."""


@dataclass(frozen=True)
class Broker:
    pid: int
    cache_dir: Path  # the TALLY_CACHE_DIR of the services.sh that started it


def broker() -> Broker:
    """The single Kafka broker's JVM (the one java process running kafka.Kafka that is
    not a node of scripts/kafka-cluster.sh's cluster) and the state directory of the
    services script that started it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except (OSError, UnicodeDecodeError):
            continue
        if "kafka.Kafka" in argv and not _cluster_node(argv):
            found.append((int(entry.name), argv))
    if len(found) != 1:
        raise FaultUnavailable(f"needs exactly one local Kafka broker process, found {len(found)}")
    pid, argv = found[0]
    config = next((a for a in argv if a.endswith("server.properties")), None)
    if config is None:
        raise FaultUnavailable("the Kafka broker was not started by scripts/services.sh")
    return Broker(pid, Path(config).parent.parent)


def _cluster_node(argv: list[str]) -> bool:
    """Whether a kafka.Kafka command line is one of the three-broker cluster's
    (`$TALLY_CACHE_DIR/kafka-cluster/broker-N/server.properties`), which runs beside
    the single broker and is not the one the single-broker faults stop."""
    return any(
        Path(a).parent.parent.name == "kafka-cluster" for a in argv if a.endswith(".properties")
    )


async def stop_broker(found: Broker, *, timeout_s: float = 60.0) -> None:
    """SIGTERM (a clean broker stop, as an operator would) and wait for the JVM to exit."""
    os.kill(found.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(found.pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the Kafka broker (pid {found.pid}) did not stop in {timeout_s}s")


async def start_services(cache_dir: Path, *, timeout_s: float = 180.0) -> None:
    """`scripts/services.sh up` on that state directory: starts what is down, waits ready."""
    await script_up("services.sh", cache_dir, timeout_s=timeout_s)


async def script_up(script: str, cache_dir: Path, *, timeout_s: float) -> None:
    """`scripts/<script> up` on the state directory `cache_dir` (services.sh and the two
    cluster scripts alike: each starts what is down and waits until it is whole); the
    tail of its output in the error when it fails."""
    path = ROOT / "scripts" / script
    if not path.exists():
        raise FaultUnavailable(f"{path} is missing: cannot start what it starts")
    proc = await asyncio.create_subprocess_exec(
        str(path), "up",
        env={**os.environ, "TALLY_CACHE_DIR": str(cache_dir)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{script} up failed ({proc.returncode}):\n{out.decode()[-2000:]}")


async def restart_broker(*, down_s: float = 0.0) -> float:
    """Stop the broker, leave it down `down_s`, start it again; the seconds it was down."""
    found = broker()
    started = time.monotonic()
    await stop_broker(found)
    await asyncio.sleep(down_s)
    await start_services(found.cache_dir)
    return time.monotonic() - started


@dataclass(frozen=True)
class PgCluster:
    pg_ctl: str
    data: str
    options: str  # the -o options it was started with (port, listen, socket dir)


async def pg_cluster(dsn: str) -> PgCluster:
    """The running PostgreSQL server's pg_ctl, data directory and start options."""
    conn = await pg.connect(dsn, None)
    try:
        data = str(await conn.fetchval("SHOW data_directory"))
    finally:
        await conn.close()
    argv = _postmaster_argv(data)
    options = argv[argv.index("-D") + 2 :]  # after the binary, -D and the data directory
    return PgCluster(str(Path(argv[0]).with_name("pg_ctl")), data, shlex.join(options))


def _postmaster_argv(data: str) -> list[str]:
    try:
        return shlex.split(Path(data, "postmaster.opts").read_text())
    except OSError as exc:
        raise FaultUnavailable(f"cannot read PostgreSQL's postmaster.opts: {exc}") from exc


async def pg_ctl(*args: str) -> None:
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    proc = await asyncio.create_subprocess_exec(
        *as_postgres, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"pg_ctl {' '.join(args)} failed:\n{out.decode()}")


async def stop_postgres(cluster: PgCluster) -> None:
    await pg_ctl(cluster.pg_ctl, "-D", cluster.data, "-m", "fast", "-w", "stop")


async def start_postgres(cluster: PgCluster) -> None:
    await pg_ctl(cluster.pg_ctl, "-D", cluster.data, "-w", "-l", "/tmp/tally-pg-restart.log",
                 "-o", cluster.options, "start")  # fmt: skip


async def restart_postgres(dsn: str, *, down_s: float = 0.0) -> float:
    """Stop PostgreSQL (fast: connections are cut), leave it down, start it again."""
    cluster = await pg_cluster(dsn)
    started = time.monotonic()
    await stop_postgres(cluster)
    try:
        await asyncio.sleep(down_s)
    finally:
        await start_postgres(cluster)
    return time.monotonic() - started


async def flush_redis(url: str, *, cluster: bool = False) -> int:
    """FLUSHDB on the database of `url` (on a cluster: on every master): everything in it
    is gone. The key count before."""
    client: Any = redis_client.connect(url, cluster=cluster)
    try:
        everywhere = redis_client.on_every_master(client)
        keys = int(await client.dbsize(**everywhere))
        await client.flushdb(**everywhere)
        return keys
    finally:
        await client.aclose()
