"""Placement: which shard (Kafka partition, PostgreSQL partition, Redis hash tag) owns an account.

This is the one function that decides placement. It is Kafka's default partitioner
(murmur2 of the key bytes, as the Java client and aiokafka compute it), so a producer
that keys a record by account with a Java or aiokafka client lands it on the right
partition. librdkafka-based clients (kcat, confluent-kafka) default to CRC32 instead;
the engine forwards what they misplace.
"""

from __future__ import annotations

from functools import lru_cache

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), as an unsigned 32-bit int."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    full = length - length % 4
    for i in range(0, full, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length % 4
    if rest == 3:
        h ^= data[full + 2] << 16
    if rest >= 2:
        h ^= data[full + 1] << 8
    if rest >= 1:
        h ^= data[full]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


@lru_cache(maxsize=1 << 16)
def shard_of(account: str, partitions: int) -> int:
    """The shard id of `account` among `partitions` shards (Kafka's default partitioner)."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    return (murmur2(account.encode()) & 0x7FFFFFFF) % partitions
