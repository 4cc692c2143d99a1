"""Pure parts of the sinks: migration file discovery and the Redis key layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from sinks.migrate import MigrationError, files, quote
from sinks.redis_store import assets_key, balance_key
from topics.shard import shard_of


def test_the_shipped_migrations_are_numbered_from_one() -> None:
    found = files()
    assert [v for v, _, _ in found] == list(range(1, len(found) + 1))
    assert found[0][1] == "projections"


@pytest.mark.parametrize(
    ("names", "error"),
    [
        (["0001_a.sql", "0003_c.sql"], "without gaps"),
        (["0001_a.sql", "0001_b.sql"], "without gaps"),
        (["1_a.sql"], "NNNN_name.sql"),
        (["0001_Bad-Name.sql"], "NNNN_name.sql"),
    ],
)
def test_bad_migration_folders_are_refused(tmp_path: Path, names: list[str], error: str) -> None:
    for name in names:
        (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=error):
        files(tmp_path)


def test_identifiers_are_quoted_safely() -> None:
    assert quote("demo-1") == '"demo-1"'
    assert quote('a"b') == '"a""b"'


def test_redis_keys_of_one_account_share_the_shard_hash_tag() -> None:
    shard = shard_of("alice", 8)
    key = balance_key("tally", shard, "alice", "USD")
    assert key == f"tally:{{{shard}}}:balance:alice:USD"
    assert assets_key("tally", shard, "alice") == f"tally:{{{shard}}}:assets:alice"
    # Redis Cluster hashes only what is inside the first {...}: the shard id.
    assert key[key.index("{") + 1 : key.index("}")] == str(shard)
