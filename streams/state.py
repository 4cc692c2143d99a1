"""What the ledger keeps per shard: balances, account settings, open holds, command records.

These structs are the values of the engine's tables (and of their changelogs), encoded as
compact JSON arrays; `streams.store` builds their keys.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from topics.schema import AccountStatus, Reason, Status


class BalanceState(msgspec.Struct, frozen=True, array_like=True):
    """One (account, asset) balance. `available` may go negative down to
    -`overdraft_limit`; `held` is what open holds reserve and is never negative."""

    available: int = 0
    held: int = 0
    seq: int = 0
    overdraft_limit: int = 0


ZERO = BalanceState()


class AccountState(msgspec.Struct, frozen=True, array_like=True):
    """An account's settings and the assets it has balances in (to close it safely)."""

    status: AccountStatus = "active"
    assets: tuple[str, ...] = ()


ACTIVE = AccountState()


class HoldState(msgspec.Struct, frozen=True, array_like=True):
    """An open hold: funds moved from available to held until released or captured."""

    asset: str
    amount: int
    expires_at_ms: int | None = None


class CommandRecord(msgspec.Struct, frozen=True, array_like=True):
    """The idempotency record of an (account, command id): what the command looked like
    (a fingerprint) and how it ended, so that a repeat can answer with the first result."""

    fingerprint: str
    status: Status
    reason: Reason | None
    at_ms: int


class StateView(Protocol):
    """Read access to one shard's state. The engine backs it with its tables, the tests
    with dicts; the ledger only reads through it and returns what to write."""

    def balance(self, account: str, asset: str) -> BalanceState | None: ...

    def account(self, account: str) -> AccountState | None: ...

    def hold(self, account: str, hold_id: str) -> HoldState | None: ...

    def command(self, account: str, command_id: str) -> CommandRecord | None:
        """The idempotency record of `command_id` on `account` (ids are scoped by account)."""
        ...
