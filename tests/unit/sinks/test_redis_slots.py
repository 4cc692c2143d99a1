"""On a Redis Cluster every multi-key command and every script call must touch keys of one
hash slot (the cluster refuses it otherwise: CROSSSLOT). Tally's keys carry the shard as a
hash tag, and each call is built for one shard: these tests check that what the key
builders, the Redis sink and the audit send keeps to one slot (the ingress reads one key a
command), and that the scripts reach no key they were not given (a key a script computes for
itself is not routed by the cluster)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from redis.crc import key_slot

from audit.redis_hashes import READ_SCRIPT
from audit.redis_hashes import Redis as AuditRedis
from sinks import redis_client, redis_store
from sinks.redis_store import LWW_SCRIPT, RedisStore, assets_key, balance_key, offset_key
from sinks.runner import Batch
from topics.schema import Entry, Result, Status

# Accounts of every shape the schema allows ([A-Za-z0-9_.:-], 1-64), assets likewise.
ACCOUNTS = ["a", "alice", "acct:with:colons", "x.y-z_0", "9" * 64, "not-a-tag"]
ASSETS = ["USD", "BTC", "ETH2"]


def _slot(key: str | bytes) -> int:
    return key_slot(key.encode() if isinstance(key, str) else key)


def _one_slot(keys: list[Any]) -> bool:
    return len({_slot(k) for k in keys}) == 1


@pytest.mark.parametrize("prefix", ["tally", "scratch-1a2b", "t_x"])
@pytest.mark.parametrize("shard", [0, 1, 7, 63, 255])
def test_a_shards_keys_share_one_slot(prefix: str, shard: int) -> None:
    keys = [offset_key(prefix, shard)]
    for account in ACCOUNTS:
        keys.append(assets_key(prefix, shard, account))
        keys += [balance_key(prefix, shard, account, asset) for asset in ASSETS]
    assert _one_slot(keys)
    # ...and the slot is the hash tag's: the shard number alone decides it.
    assert _slot(keys[0]) == key_slot(str(shard).encode())


def test_shards_spread_over_slots() -> None:
    """Not all shards in one slot: a cluster spreads them over its masters."""
    slots = {_slot(offset_key("tally", shard)) for shard in range(256)}
    assert len(slots) == 256


def _entry(account: str, asset: str, seq: int) -> Entry:
    return Entry(
        account=account, asset=asset, seq=seq, available=seq * 10, held=0,
        delta_available=10, delta_held=0,
    )  # fmt: skip


def _result(command_id: str, entries: list[Entry]) -> Result:
    return Result(
        command_id=command_id, account=entries[0].account, kind="deposit",
        status=Status.APPLIED, entries=entries, at_ms=1,
    )  # fmt: skip


async def test_the_sinks_script_calls_each_touch_one_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[list[Any], list[Any]]] = []

    async def capture(client: Any, script: Any, calls: Any) -> list[Any]:
        sent.extend(calls)
        return [1] * len(calls)

    monkeypatch.setattr(redis_store.redis_client, "run_script", capture)
    store = RedisStore("redis://127.0.0.1:1/0", "tally", 8, cluster=True)
    store.client = object()  # never used: run_script is captured
    events = [
        (shard, _result(f"c{shard}-{i}", [_entry(a, asset, i + 1) for asset in ASSETS]))
        for shard in range(8)
        for i, a in enumerate(ACCOUNTS)
    ]
    batch = Batch(
        topic="tally.events",
        events=events,
        sources=list(range(len(events))),
        offsets={p: 100 + p for p in range(8)},
        start={p: 50 + p for p in range(8)},
    )
    await store.write(batch)
    assert len(sent) == 8  # one call per shard the batch advances
    for keys, _ in sent:
        assert _one_slot(keys)
    assert len({_slot(keys[0]) for keys, _ in sent}) == 8


async def test_the_audits_read_calls_each_touch_one_slot() -> None:
    seen: list[list[str]] = []

    async def script(keys: list[str]) -> list[Any]:
        seen.append(keys)
        return [None, None, None, 0] * (len(keys) // 2)

    audit = AuditRedis("redis://127.0.0.1:1/0", "tally", "redis://...", cluster=True)
    audit.script = script
    for shard in (0, 5, 200):
        await audit.read(shard, [f"{a}|{asset}" for a in ACCOUNTS for asset in ASSETS])
    assert len(seen) == 3
    for keys in seen:
        assert _one_slot(keys)


@pytest.mark.parametrize("script", [LWW_SCRIPT, READ_SCRIPT])
def test_the_scripts_touch_only_the_keys_they_are_given(script: str) -> None:
    """Every redis.call names its key as KEYS[...]: none is computed inside the script,
    where the cluster could not route it (a computed key may live on another node)."""
    calls = re.findall(r"redis\.call\('(\w+)',\s*([^,)]+)", script)
    assert calls
    for command, key in calls:
        assert key.startswith("KEYS["), f"{command} on {key}"


def test_the_cluster_client_is_built_only_when_asked() -> None:
    plain = redis_client.connect("redis://127.0.0.1:1/0", cluster=False)
    cluster = redis_client.connect("redis://127.0.0.1:1/0", cluster=True)
    assert not redis_client.is_cluster(plain)
    assert redis_client.is_cluster(cluster)
    assert redis_client.on_every_master(plain) == {}
    assert redis_client.on_every_master(cluster) == {"target_nodes": "primaries"}
    assert cluster.retry.get_retries() == redis_client.cluster_retries


def test_a_cluster_that_cannot_be_reached_is_an_outage() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisClusterException

    with pytest.raises(RedisConnectionError), redis_client.outages():
        raise RedisClusterException("Redis Cluster cannot be connected. Please provide ...")
    with pytest.raises(RedisClusterException), redis_client.outages():
        raise RedisClusterException("EVALSHA - all keys must map to the same key slot")
    with pytest.raises(RedisClusterException), redis_client.outages():
        raise RedisClusterException(
            "Redis Cluster cannot be connected. Please provide at least one reachable node:"
            " Cluster mode is not enabled on this node"
        )
    assert issubclass(RedisConnectionError, redis_client.UNAVAILABLE)
