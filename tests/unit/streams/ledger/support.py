"""What every ledger rule test shares: commands run against one in-memory shard and
committed the way the engine does, snapshots of its tables, and the assertions that a
command was applied, or rejected with nothing changed but its own idempotency record."""

from __future__ import annotations

import copy
from typing import Any

from streams.ledger import Outcome, apply
from streams.memory import MemoryShard
from streams.state import BalanceState
from topics import limits
from topics.schema import (
    Command,
    Configure,
    Credit,
    Deposit,
    Hold,
    Reason,
    Status,
)

NOW = 1_700_000_000_000
MAX = limits.AMOUNT_MAX


def run(shard: MemoryShard, command: Command, now: int = NOW) -> Outcome:
    """Apply one command and commit its outcome, as the engine does."""
    outcome = apply(shard, command, now)
    shard.commit(outcome)
    return outcome


def snapshot(shard: MemoryShard) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "balances": shard.balances,
            "accounts": shard.accounts,
            "holds": shard.holds,
            "commands": shard.commands,
        }
    )


def bal(shard: MemoryShard, account: str, asset: str = "USD") -> BalanceState:
    found = shard.balance(account, asset)
    assert found is not None, f"no balance for {account} {asset}"
    return found


def deposit(shard: MemoryShard, account: str, amount: int, asset: str = "USD") -> Outcome:
    outcome = run(
        shard,
        Deposit(
            command_id=f"dep-{account}-{asset}-{len(shard.commands)}",
            account=account,
            asset=asset,
            amount=amount,
        ),
    )
    assert outcome.result.status is Status.APPLIED, outcome.result
    return outcome


def configure(shard: MemoryShard, account: str, cid: str | None = None, **fields: Any) -> Outcome:
    cid = cid or f"cfg-{account}-{len(shard.commands)}"
    return run(shard, Configure(command_id=cid, account=account, **fields))


def assert_applied(outcome: Outcome) -> None:
    assert outcome.result.status is Status.APPLIED, outcome.result
    assert outcome.result.reason is None
    assert outcome.record is not None and outcome.record.status is Status.APPLIED


def assert_rejected(
    outcome: Outcome, reason: Reason, before: dict[str, Any], shard: MemoryShard
) -> None:
    """Rejected with `reason`; nothing changed but the command's own idempotency record."""
    result = outcome.result
    assert result.status is Status.REJECTED, result
    assert result.reason is reason, result
    assert result.entries == []
    after = snapshot(shard)
    for table in ("balances", "accounts", "holds"):
        assert after[table] == before[table], table
    new_commands = {k: v for k, v in after["commands"].items() if k not in before["commands"]}
    assert set(new_commands) == {(result.account, result.command_id)}
    record = new_commands[(result.account, result.command_id)]
    assert record.status is Status.REJECTED
    assert record.reason is reason


def hold(
    shard: MemoryShard,
    amount: int,
    hold_id: str = "h1",
    account: str = "alice",
    expires: int | None = None,
    cid: str = "hold1",
) -> Outcome:
    return run(
        shard,
        Hold(
            command_id=cid,
            account=account,
            hold_id=hold_id,
            asset="USD",
            amount=amount,
            expires_at_ms=expires,
        ),
    )


def credit(account: str = "bob", amount: int = 40, cid: str = "t1/credit") -> Credit:
    return Credit(
        command_id=cid,
        account=account,
        asset="USD",
        amount=amount,
        origin_command_id="t1",
        origin_account="alice",
    )


TWO_127 = 2**127 - 1
