"""An in-memory shard: the ledger's state in plain dicts, for tests, benchmarks and models."""

from __future__ import annotations

from streams.ledger import Outcome
from streams.state import AccountState, BalanceState, CommandRecord, HoldState


class MemoryShard:
    """One shard's state held in dicts; `commit` writes an outcome the way the engine does."""

    def __init__(self) -> None:
        self.balances: dict[tuple[str, str], BalanceState] = {}
        self.accounts: dict[str, AccountState] = {}
        self.holds: dict[tuple[str, str], HoldState] = {}
        self.commands: dict[tuple[str, str], CommandRecord] = {}  # (account, command_id)

    def balance(self, account: str, asset: str) -> BalanceState | None:
        return self.balances.get((account, asset))

    def account(self, account: str) -> AccountState | None:
        return self.accounts.get(account)

    def hold(self, account: str, hold_id: str) -> HoldState | None:
        return self.holds.get((account, hold_id))

    def command(self, account: str, command_id: str) -> CommandRecord | None:
        return self.commands.get((account, command_id))

    def commit(self, outcome: Outcome) -> None:
        self.balances.update(outcome.balances)
        self.accounts.update(outcome.accounts)
        for key, held in outcome.holds.items():
            if held is None:
                self.holds.pop(key, None)
            else:
                self.holds[key] = held
        if outcome.record is not None:
            self.commands[(outcome.result.account, outcome.result.command_id)] = outcome.record
