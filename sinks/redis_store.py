"""The Redis store: the read cache of balances, last-writer-wins on `seq`.

Each balance is one hash, `<prefix>:{<shard_id>}:balance:<account>:<asset>` with fields
`available`, `held`, `seq`; `<prefix>:{<shard_id>}:assets:<account>` is the set of an
account's assets, so a reader can list them. The `{shard_id}` hash tag puts one shard's
keys in one Redis Cluster slot, which is what lets one script call write a whole shard's
share of a batch: per batch, one `EVALSHA` per shard (`EVAL` on a cluster), pipelined.
The script writes a balance only when its `seq` is newer than the stored one, so replays,
repeats and out-of-order writers can never move a balance backwards.

Redis is a cache that can lose everything (FLUSHALL, a restart without persistence, a
failover to an empty or older replica). So the sink keeps its progress in Redis, not in
Kafka: `<prefix>:{<shard_id>}:offset` holds the next events offset of that partition,
set by the same script call as the partition's balances (one atomic step) and only ever
moved forward. A call that finds that progress gone, or behind what the sink had written
there, writes nothing; the sink (`StoreLost`) then reads the events topic again from
the offsets Redis still has, rebuilding it without an operator.

On a Redis Cluster (`TALLY_REDIS_CLUSTER`) nothing changes but the client: each call's
keys are one shard's, so one slot's, and the pipeline goes to every master at once, each
with its shards' calls. A master's failover is an outage like any other (waited out, then
the batch written again: the script is idempotent); a write the dead master acknowledged
but never passed to its replica is progress gone, which the next call or probe notices
(`StoreLost`), and the partitions are read again from what the new master holds.
"""

from __future__ import annotations

from typing import Any

from sinks import redis_client
from sinks.runner import Batch, StoreLost

# KEYS: the partition's progress key, then balance key, assets key, balance key, ...
# ARGV: the offset the sink believes Redis holds for the partition (0: nothing yet), the
# batch's next offset, then "available:held:seq" per balance (one argument each: packing
# arguments is most of the client's work). The asset is the balance key's last segment
# (assets never hold ':'). Returns the number of balances written, or -1 without writing
# anything when the progress the sink had written is gone or behind what it wrote (Redis
# lost its data, or came back from an older snapshot).
# The progress only ever moves forward, so a replay beside a live sink cannot move it back.
# Money never becomes a Lua number (a double: exact only to 2^53): `available` and `held`
# are decimal strings of any length, matched as digits and stored as given; only `seq`
# and the offsets, counters far below 2^53, are compared with tonumber.
LWW_SCRIPT = """
local stored = redis.call('GET', KEYS[1])
if tonumber(ARGV[1]) > 0 and (stored == false or tonumber(stored) < tonumber(ARGV[1])) then
  return -1
end
local written = 0
for i = 2, #KEYS, 2 do
  local available, held, seq = string.match(ARGV[i / 2 + 2], '^(-?%d+):(%d+):(%d+)$')
  local current = redis.call('HGET', KEYS[i], 'seq')
  if current == false or tonumber(current) < tonumber(seq) then
    redis.call('HSET', KEYS[i], 'available', available, 'held', held, 'seq', seq)
    redis.call('SADD', KEYS[i + 1], string.match(KEYS[i], '([^:]+)$'))
    written = written + 1
  end
end
if stored == false or tonumber(stored) < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[2])
end
return written
"""


def balance_key(prefix: str, shard: int, account: str, asset: str) -> str:
    return f"{prefix}:{{{shard}}}:balance:{account}:{asset}"


def assets_key(prefix: str, shard: int, account: str) -> str:
    return f"{prefix}:{{{shard}}}:assets:{account}"


def offset_key(prefix: str, shard: int) -> str:
    """The sink's progress in events partition `shard` (partition = shard)."""
    return f"{prefix}:{{{shard}}}:offset"


def script_call(prefix: str, shard: int, start: int, end: int) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of one LWW_SCRIPT call for a partition, before its balances:
    the progress key, the offset the store should hold, the offset it moves to."""
    return [offset_key(prefix, shard)], [start, end]


def add_balance(
    call: tuple[list[str], list[Any]], prefix: str, shard: int, account: str, asset: str,
    available: int, held: int, seq: int,
) -> None:  # fmt: skip
    """One balance more in a script call (see LWW_SCRIPT for the layout)."""
    keys, args = call
    keys += (balance_key(prefix, shard, account, asset), assets_key(prefix, shard, account))
    args.append(b"%d:%d:%d" % (available, held, seq))


class RedisStore:
    name = "redis"
    unavailable: tuple[type[BaseException], ...] = redis_client.UNAVAILABLE

    def __init__(self, url: str, prefix: str, partitions: int, *, cluster: bool = False) -> None:
        self.url = url
        self.cluster = cluster
        self.prefix = prefix
        self.partitions = partitions
        self.client: Any = None
        self.script: Any = None
        self.written = 0

    def _connect(self, timeout_s: float = 10.0) -> Any:
        return redis_client.connect(
            self.url,
            cluster=self.cluster,
            socket_timeout=timeout_s,
            socket_connect_timeout=min(timeout_s, 5.0),
        )

    async def open(self) -> None:
        client = self._connect()
        try:
            with redis_client.outages():
                await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self.client = client
        self.script = client.register_script(LWW_SCRIPT)

    async def ping(self, timeout_s: float) -> None:
        """Whether Redis answers now, on a connection of its own (for readiness)."""
        client = self._connect(timeout_s)
        try:
            with redis_client.outages():
                await client.ping()
        finally:
            await client.aclose()

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

    async def offsets(self, topic: str) -> dict[int, int]:
        """The stored progress per partition; a partition Redis knows nothing of is
        absent (the runner reads it from the beginning). `topic` is implied by the prefix."""
        if self.client is None:
            await self.open()
        with redis_client.outages():
            async with self.client.pipeline(transaction=False) as pipe:
                for p in range(self.partitions):
                    pipe.get(offset_key(self.prefix, p))
                values = await pipe.execute()
        return {p: int(v) for p, v in enumerate(values) if v is not None}

    async def write(self, batch: Batch) -> None:
        if self.client is None:
            await self.open()
        # The last state of each balance in the batch; the script still checks seq.
        latest: dict[tuple[int, str, str], tuple[int, int, int]] = {}
        for shard, result in batch.events:
            for e in result.entries:
                key = (shard, e.account, e.asset)
                if key not in latest or latest[key][2] < e.seq:
                    latest[key] = (e.available, e.held, e.seq)
        # Every partition the batch advances gets its call, balances or not: its
        # progress moves with it.
        by_shard = {
            p: script_call(self.prefix, p, batch.start.get(p, 0), end)
            for p, end in sorted(batch.offsets.items())
        }
        for (shard, account, asset), (available, held, seq) in latest.items():
            add_balance(by_shard[shard], self.prefix, shard, account, asset, available, held, seq)
        if not by_shard:
            return
        with redis_client.outages():
            written = await redis_client.run_script(
                self.client, self.script, list(by_shard.values())
            )
        lost = [p for p, n in zip(by_shard, written, strict=True) if int(n) < 0]
        self.written += sum(int(n) for n in written if int(n) > 0)
        if lost:
            raise StoreLost(lost)
