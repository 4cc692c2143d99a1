"""The seeded workload the demo, the benchmarks, chaos and the tests send: one seed gives
one list of records, byte for byte (a failed run is repeated by its seed), with every
kind of the mix in it."""

from __future__ import annotations

import hashlib
from collections import Counter

from harness.workload import build

NOW_MS = 1_700_000_000_000


def _digest(seed: int) -> str:
    work = build(count=3000, accounts=100, seed=seed, now_ms=NOW_MS)
    lines = (r.key.encode() + b"|" + r.value + b"|" + r.kind.encode() + b"\n" for r in work.records)
    return hashlib.sha256(b"".join(lines)).hexdigest()


def test_one_seed_gives_the_same_records_as_before() -> None:
    # Pinned: a change of the draw order changes every seeded run's records.
    assert _digest(1) == "41cf5ebda5bf2c7b1a8aae116e6e48f7f3cb6c90a088c28a6f03683384e0334c"
    assert _digest(2) != _digest(1)


def test_the_mix_has_every_kind() -> None:
    work = build(count=3000, accounts=100, seed=1, now_ms=NOW_MS)
    kinds = Counter(r.kind for r in work.records)
    assert set(kinds) == {
        "deposit", "configure", "transfer", "withdraw", "disburse", "hold", "capture",
        "release", "retry", "reuse", "invalid", "garbage",
    }  # fmt: skip
    assert work.garbage == kinds["garbage"]
    assert NOW_MS + 2_000 <= work.hold_expiry_max_ms < NOW_MS + 5_000
    quiet = build(count=3000, accounts=100, seed=1, now_ms=NOW_MS, expiring_holds=False,
                  invalid=False)  # fmt: skip
    assert quiet.hold_expiry_max_ms == 0 and quiet.garbage == 0
