"""The ledger's state over Faust tables: reads for `ledger.apply`, writes of its outcomes.

Each table is RocksDB-backed (rocksdict) and mirrored to a compacted changelog topic.
Faust writes a table's changelog record to the partition of the event being processed,
which is the account's shard, so a shard's state always sits in changelog partition p.
Values are the msgspec array encodings of `streams.state`; keys are plain strings.
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


class TableState:
    """A `StateView` over the engine's four tables, plus `commit` to write an outcome.

    The tables are faust.Table objects (typed Any: faust ships no type information).
    """

    def __init__(self, *, balances: Any, accounts: Any, holds: Any, commands: Any) -> None:
        self.balances = balances
        self.accounts = accounts
        self.holds = holds
        self.commands = commands

    def balance(self, account: str, asset: str) -> BalanceState | None:
        raw = self.balances.get(balance_key(account, asset))
        return None if raw is None else _balance.decode(raw)

    def account(self, account: str) -> AccountState | None:
        raw = self.accounts.get(account)
        return None if raw is None else _account.decode(raw)

    def hold(self, account: str, hold_id: str) -> HoldState | None:
        raw = self.holds.get(hold_key(account, hold_id))
        return None if raw is None else _hold.decode(raw)

    def command(self, command_id: str) -> CommandRecord | None:
        raw = self.commands.get(command_id)
        return None if raw is None else _record.decode(raw)

    def commit(self, outcome: Outcome) -> None:
        """Write what the outcome changed. Must run while the command's event is the
        current event, so that Faust sends the changelog records to its partition."""
        for (account, asset), bal in outcome.balances.items():
            self.balances[balance_key(account, asset)] = _encode(bal)
        for account, acct in outcome.accounts.items():
            self.accounts[account] = _encode(acct)
        for (account, hold_id), held in outcome.holds.items():
            key = hold_key(account, hold_id)
            if held is None:
                self.holds.pop(key, None)
            else:
                self.holds[key] = _encode(held)
        if outcome.record is not None:
            self.commands[outcome.result.command_id] = _encode(outcome.record)

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
        for key, raw in self.holds.items():
            text = key.decode() if isinstance(key, bytes) else key
            account, _, hold_id = text.partition("|")
            out.append((account, hold_id, _hold.decode(raw)))
        return out
