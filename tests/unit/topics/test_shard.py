"""Placement: `murmur2` is Kafka's, and `shard_of` picks the partition Kafka's default
partitioner (Java client, aiokafka) picks for the same key."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from topics import limits
from topics.shard import murmur2, shard_of


def signed32(value: int) -> int:
    assert 0 <= value < 2**32, value
    return value - 2**32 if value >= 2**31 else value


# org.apache.kafka.common.utils.UtilsTest#testMurmur2
JAVA_VECTORS = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]


@pytest.mark.parametrize(
    ("data", "expected"), JAVA_VECTORS, ids=[v[0].decode() for v in JAVA_VECTORS]
)
def test_murmur2_matches_the_java_client(data: bytes, expected: int) -> None:
    assert signed32(murmur2(data)) == expected


def test_murmur2_is_unsigned_32_bit() -> None:
    assert murmur2(b"21") == -973932308 + 2**32


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_murmur2_matches_aiokafka(data: bytes) -> None:
    ours = murmur2(data)
    assert 0 <= ours < 2**32
    assert ours == aiokafka_murmur2(data) & 0xFFFFFFFF


accounts = st.from_regex(limits.ACCOUNT_ID_PATTERN, fullmatch=True)


@settings(max_examples=500)
@given(accounts, st.integers(1, 512))
def test_shard_of_matches_aiokafka_default_partitioner(account: str, partitions: int) -> None:
    all_partitions = list(range(partitions))
    expected = DefaultPartitioner()(account.encode(), all_partitions, all_partitions)
    assert shard_of(account, partitions) == expected


@settings(max_examples=300)
@given(st.text(max_size=80), st.integers(1, 10_000))
def test_shard_of_is_in_range(account: str, partitions: int) -> None:
    shard = shard_of(account, partitions)
    assert 0 <= shard < partitions


def test_shard_of_uses_the_positive_part_of_the_hash() -> None:
    # b"21" hashes negative as a Java int: Kafka masks the sign bit before the modulo.
    assert signed32(murmur2(b"21")) < 0
    assert shard_of("21", 1_000_003) == (murmur2(b"21") & 0x7FFFFFFF) % 1_000_003
    assert shard_of("21", 1_000_003) != murmur2(b"21") % 1_000_003


def test_shard_of_one_partition_is_zero() -> None:
    assert {shard_of(f"acct-{i}", 1) for i in range(50)} == {0}


def test_shard_of_spreads_accounts() -> None:
    assert len({shard_of(f"acct-{i}", 8) for i in range(200)}) == 8


@pytest.mark.parametrize("partitions", [0, -1, -256])
def test_shard_of_rejects_fewer_than_one_partition(partitions: int) -> None:
    with pytest.raises(ValueError, match="partitions"):
        shard_of("alice", partitions)
