"""The one place a Redis client is built: a plain client for one Redis, or, with
`TALLY_REDIS_CLUSTER=true`, redis-py's asyncio cluster client against a Redis Cluster
reached through any of its nodes (`TALLY_REDIS_URL`). Every Redis user of Tally (the Redis
sink, the ingress's cached reads and replay check, the audit, the checks and tools the
harness and benchmarks share) connects through `connect`, so the setting switches all of
them at once and none can be left talking to the wrong kind of server.

Why a cluster needs no other change: every key Tally writes or reads per account carries its
shard as a hash tag (`<prefix>:{<shard>}:...`, DESIGN.md), so one shard's keys live in one
slot, and every multi-key command and script call is built for one shard. (The cluster
refuses a call whose keys span slots; `tests/unit/sinks/test_redis_slots.py` checks the key
builders keep each call in one slot.) A cluster pipeline splits its commands by node and
sends each node its share at once, so a sink batch (one script call per shard) costs one
round trip per master, in parallel.

Failover: when a master dies, the cluster client's commands fail with connection errors
until a replica is promoted (the cluster's node timeout plus an election, a few seconds).
redis-py 8.1's cluster client uses its `Retry` only for the number of attempts (each a
topology refresh and a retry, a fixed 0.25 s apart in a pipeline): it cannot wait out a
failover, and is not meant to. What it raises then is in `UNAVAILABLE`, which the sink
waits out with its own backoff (`sinks.retry`), reopening the client (a fresh topology)
between tries; readers answer 503 meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.settings import Settings

# The cluster client's attempts at a command or pipeline (each after a topology refresh),
# and the backoff redis-py may apply between them (8.1 reads only the count; see above).
cluster_retries = 3
cluster_backoff_base_s = 0.05
cluster_backoff_cap_s = 0.5

# Raised while Redis (or one master's slots, during a failover) cannot be reached: to be
# waited out, not reported as the data's fault.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,  # CLUSTERDOWN, MASTERDOWN: slots without a master for now
    TryAgainError,  # a slot migrating
    SlotNotCoveredError,  # the client's slot map has a hole until it refreshes
)
# Anything a Redis call can fail with, for readers that answer "Redis unavailable" (503)
# or report the failure: the cluster client raises RedisClusterException (not a RedisError)
# when no node answers or a call cannot be routed.
ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, RedisClusterException)

# What RedisClusterException says when the cluster, not the call, is the problem; and what
# it adds when a node answered but is no cluster node (TALLY_REDIS_CLUSTER=true against a
# single Redis): a mistake in the settings, raised as it is rather than waited out.
_UNREACHABLE = ("Redis Cluster cannot be connected", "All slots are not covered")
_NOT_A_CLUSTER = "Cluster mode is not enabled"


def connect(
    url: str,
    *,
    cluster: bool,
    socket_timeout: float | None = 10.0,
    socket_connect_timeout: float | None = 5.0,
) -> Any:
    """A client for `url`: one Redis, or the cluster `url` is a node of. Connects lazily
    (the first command); `aclose()` when done."""
    if not cluster:
        return aioredis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout
        )
    return RedisCluster.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        retry=Retry(
            ExponentialWithJitterBackoff(base=cluster_backoff_base_s, cap=cluster_backoff_cap_s),
            retries=cluster_retries,
        ),
        # A slot without a master (mid-failover) fails only the calls for it: the other
        # masters' shards keep being written and read.
        require_full_coverage=False,
    )


def connect_to(settings: Settings, **timeouts: float | None) -> Any:
    """`connect` for a deployment's settings (TALLY_REDIS_URL, TALLY_REDIS_CLUSTER)."""
    return connect(settings.redis_url, cluster=settings.redis_cluster, **timeouts)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def on_every_master(client: Any) -> dict[str, Any]:
    """The keyword arguments that send a keyless command (DBSIZE, FLUSHDB) to every master
    of a cluster, whose replies redis-py then sums; none for one Redis."""
    return {"target_nodes": RedisCluster.PRIMARIES} if is_cluster(client) else {}


@contextlib.contextmanager
def outages() -> Iterator[None]:
    """Turn the cluster client's "no node answers" (a RedisClusterException) into the
    connection error a single Redis raises for the same outage, so that callers wait it
    out alike; any other RedisClusterException (a call that cannot be routed, a URL that
    is no cluster node) stays."""
    try:
        yield
    except RedisClusterException as exc:
        if str(exc).startswith(_UNREACHABLE) and _NOT_A_CLUSTER not in str(exc):
            raise RedisConnectionError(str(exc)) from exc
        raise


async def run_script(
    client: Any, script: Any, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
) -> list[Any]:
    """Every (keys, args) call of a registered `script`, in one pipeline; their replies in
    order. Each call's keys must share a slot. A plain pipeline sends EVALSHA, loading the
    script first if Redis lacks it. A cluster pipeline refuses EVALSHA (redis-py: a node
    may lack the script, and it would not load it there), so it sends EVAL, the script's
    text with each call: no node, new, restarted or just promoted, can lack it, and the
    text (under 1 KB) is small beside a shard's share of a batch."""
    if not is_cluster(client):
        async with client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                await script(keys=keys, args=args, client=pipe)
            return list(await pipe.execute())
    async with client.pipeline(transaction=False) as pipe:
        for keys, args in calls:
            pipe.eval(script.script, len(keys), *keys, *args)
        return list(await pipe.execute())
