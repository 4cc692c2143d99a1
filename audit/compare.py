"""Comparing one balance: the ledger's own consistency, then every store against the
ledger's recomputation."""

from __future__ import annotations

from audit.rows import STORES, Found, LedgerRow, Mismatch, describe


def compare(
    shard: int,
    key: str,
    row: LedgerRow | None,
    engine: Found | None,
    redis: Found | None,
    *,
    with_engine: bool = True,
    with_redis: bool = True,
    redis_listed: bool = True,
) -> list[Mismatch]:
    """Every disagreement about one balance: the ledger's own consistency, then each
    store against the ledger's recomputation. A mismatch carries the ledger's seq, or
    the store's when the ledger has no entries for the balance."""
    ledger = row.ledger if row is not None else None
    stores: list[tuple[str, Found | None]] = [("postgres", row.balance if row else None)]
    if with_redis:
        stores.append(("redis", redis))
    if with_engine:
        stores.append(("engine", engine))
    if (
        ledger is not None
        and row is not None
        and row.first_seq == 1
        and row.last_seq == row.entries
        and (row.breakpoint_seq is None or (row.sum_available, row.sum_held) == ledger[:2])
        and (redis_listed or not with_redis)
        and all(value == ledger for _, value in stores)
    ):
        return []  # the usual case, decided without building any text
    account, _, asset = key.rpartition("|")
    out: list[Mismatch] = []

    def differ(kind: str, expected: str, found: str, value: Found | None = None) -> None:
        seq = ledger[2] if ledger is not None else value[2] if value is not None else None
        out.append(Mismatch(kind, shard, account, asset, seq, expected, found))

    if row is not None and row.entries is not None:
        if row.first_seq != 1 or row.last_seq != row.entries:
            differ(
                "seq_gap",
                f"seq 1..{row.last_seq} once each",
                f"{row.entries} entries from seq {row.first_seq} to {row.last_seq}",
            )
        if row.breakpoint_seq is not None and ledger is not None:
            summed = (row.sum_available, row.sum_held)
            if summed != ledger[:2]:
                differ(
                    "breakpoint",
                    f"available {summed[0]}, held {summed[1]} (the sum of all entries)",
                    f"available {ledger[0]}, held {ledger[1]} (breakpoint at seq "
                    f"{row.breakpoint_seq} + later entries)",
                )
    for kind, value in stores:
        if value != ledger:
            expected = "no balance (no ledger entries)" if ledger is None else describe(ledger)
            differ(kind, f"(ledger) {expected}", f"({STORES[kind]}) {describe(value)}", value)
    if with_redis and redis is not None and not redis_listed:
        differ("redis", f"{asset} in the account's asset set", "not listed", redis)
    return out
