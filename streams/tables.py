"""The ledger's state over Faust tables: reads for `ledger.apply`, writes of its outcomes.

Each table is RocksDB-backed (rocksdict) and mirrored to a compacted changelog topic;
faust restores a table from its changelog on start. Writes do not go through faust's
table API, which queues changelog records in a buffer that its commits do not wait
for: an outcome's changelog records are returned to the engine, which produces them
in the same transaction as the result and the consumed offset. Local writes use the
store's byte-level methods and land in the RocksDB of the current event's partition,
which is the account's shard. Values are the msgspec array encodings of
`streams.state`; keys are UTF-8 strings.
"""

from __future__ import annotations

from typing import Any

import msgspec

from streams.ledger import Outcome
from streams.state import (
    AccountState,
    BalanceState,
    CommandRecord,
    HoldState,
    balance_key,
    hold_key,
)

_balance = msgspec.json.Decoder(BalanceState)
_account = msgspec.json.Decoder(AccountState)
_hold = msgspec.json.Decoder(HoldState)
_record = msgspec.json.Decoder(CommandRecord)
_encode = msgspec.json.Encoder().encode

TABLE_NAMES = ("balances", "accounts", "holds", "commands")

# (changelog topic, key, value or None for a deletion)
ChangelogRecord = tuple[str, bytes, bytes | None]


class TableState:
    """A `StateView` over the engine's four tables, plus `commit` to write an outcome.

    `tables` maps each name of TABLE_NAMES to its faust.Table (typed Any: faust ships no
    type information); `changelogs` maps it to its changelog topic.
    """

    def __init__(self, tables: dict[str, Any], changelogs: dict[str, str]) -> None:
        self.tables = tables
        self.changelogs = changelogs

    def _get(self, table: str, key: str) -> bytes | None:
        value: bytes | None = self.tables[table].data._get(key.encode())
        return value

    def balance(self, account: str, asset: str) -> BalanceState | None:
        raw = self._get("balances", balance_key(account, asset))
        return None if raw is None else _balance.decode(raw)

    def account(self, account: str) -> AccountState | None:
        raw = self._get("accounts", account)
        return None if raw is None else _account.decode(raw)

    def hold(self, account: str, hold_id: str) -> HoldState | None:
        raw = self._get("holds", hold_key(account, hold_id))
        return None if raw is None else _hold.decode(raw)

    def command(self, command_id: str) -> CommandRecord | None:
        raw = self._get("commands", command_id)
        return None if raw is None else _record.decode(raw)

    def commit(self, outcome: Outcome) -> list[ChangelogRecord]:
        """Write what the outcome changed locally and return the changelog records that
        make it durable. Must run while the command's event is the current event."""
        out: list[ChangelogRecord] = []
        for (account, asset), bal in outcome.balances.items():
            out.append(self._put("balances", balance_key(account, asset), _encode(bal)))
        for account, acct in outcome.accounts.items():
            out.append(self._put("accounts", account, _encode(acct)))
        for (account, hold_id), held in outcome.holds.items():
            value = None if held is None else _encode(held)
            out.append(self._put("holds", hold_key(account, hold_id), value))
        if outcome.record is not None:
            out.append(self._put("commands", outcome.result.command_id, _encode(outcome.record)))
        return out

    def _put(self, table: str, key: str, value: bytes | None) -> ChangelogRecord:
        store = self.tables[table].data
        raw_key = key.encode()
        if value is None:
            store._del(raw_key)
        else:
            store._set(raw_key, value)
        return (self.changelogs[table], raw_key, value)

    def balances_of(self, account: str) -> dict[str, BalanceState]:
        """Every asset's balance of one account (for the table view)."""
        acct = self.account(account)
        out: dict[str, BalanceState] = {}
        for asset in acct.assets if acct else ():
            bal = self.balance(account, asset)
            if bal is not None:
                out[asset] = bal
        return out

    def open_holds(self) -> list[tuple[str, str, HoldState]]:
        """Every open hold of the shards this worker serves, as (account, hold_id, hold)."""
        out = []
        for key, raw in self.tables["holds"].data.items():
            text = key.decode() if isinstance(key, bytes) else key
            account, _, hold_id = text.partition("|")
            out.append((account, hold_id, _hold.decode(raw)))
        return out
