"""The ledger rules: a pure, deterministic function of (shard state, command, time) -> outcome.

No I/O and no Kafka or Faust import. The engine's agents, the benchmarks and the property
tests all call `apply`; the engine then writes `Outcome`'s changes to its tables, the
result to the events topic and `Outcome.emits` to the internal topic.

Every command is checked in this fixed order, and the first failing check is its reason:
1. idempotency: a known command_id answers `duplicate` (same payload) or is rejected
   `command_id_reused` (different payload);
2. shape rules the schema cannot state (`same_account`, `nothing_to_configure`, ...);
3. account status of the account that pays (`account_closed`, then `account_frozen`);
4. hold existence and state (`hold_exists`, `hold_not_found`, `hold_expired`, ...);
5. funds (`insufficient_funds` beyond the overdraft limit);
6. the balance cap (`balance_overflow`), see below, and the number of assets one
   account may hold (`too_many_assets`, limits.ACCOUNT_ASSETS_MAX).
Rejections are values, not exceptions, and change nothing but the idempotency record.

Money conservation: only `deposit` creates money and only `withdraw` and external
`capture` destroy it. A transfer, disbursement or capture to an account debits here and
emits `credit` commands for the payees' shards; a credit that cannot be applied there
emits a `refund` back here, which always applies.

Bounds (the numbers are in `topics.limits`). Every amount is 1..2^127-1, a
disbursement's total too. Balances are Python ints and every store keeps them without a
width (JSON integers in events, RocksDB and changelogs, PostgreSQL `numeric`, decimal
strings in Redis), so no arithmetic here can overflow; the cap exists for clients and
downstream systems, and it only ever refuses a command that can be refused safely:
- money from outside a balance is capped: a `deposit` or `credit` that would take
  `available` past BALANCE_MAX (2^127-1), and a `hold` that would take `held` past it,
  are rejected `balance_overflow` (a rejected credit is refunded to its payer);
- money a balance gets back is never refused: a `refund` (its own debit returning), a
  `release`, an expiry and the released rest of a `capture` always apply, whatever the
  balance. Refusing one would destroy the money (a refund has nowhere else to go) or
  leave a hold stuck for ever. So `available` can pass BALANCE_MAX, by at most what was
  the balance's own and on its way back (refunds in flight, open holds) when deposits
  refilled it;
- a debit never takes `available` below -overdraft_limit (>= -2^127+1).
The stateful property test checks conservation, the overdraft floor and seq continuity
after every step with amounts at every width boundary and refunds meeting full balances.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streams.state import (
    ACTIVE,
    ZERO,
    AccountState,
    BalanceState,
    CommandRecord,
    HoldState,
    StateView,
)
from topics import limits
from topics.codec import Invalid, encode
from topics.ids import credit_id, refund_id
from topics.schema import (
    Capture,
    Command,
    Configure,
    Credit,
    Deposit,
    Disburse,
    Entry,
    Expire,
    FirstResult,
    Hold,
    InternalCommand,
    Reason,
    Refund,
    Release,
    Result,
    Status,
    Transfer,
    Withdraw,
    kind_of,
)


@dataclass(slots=True)
class Outcome:
    """What one command decided. `holds` maps (account, hold_id) to the new hold or
    None for a hold that is gone; `record` is None when nothing is to be remembered."""

    result: Result
    balances: dict[tuple[str, str], BalanceState] = field(default_factory=dict)
    accounts: dict[str, AccountState] = field(default_factory=dict)
    holds: dict[tuple[str, str], HoldState | None] = field(default_factory=dict)
    record: CommandRecord | None = None
    emits: list[InternalCommand] = field(default_factory=list)


class _Rejected(Exception):
    """Internal control flow only: a rule failed. Never escapes `apply`."""

    def __init__(self, reason: Reason, detail: str | None = None) -> None:
        self.reason = reason
        self.detail = detail


def fingerprint(command: Command) -> str:
    """A digest of the command's content, to tell a retry from a reused command_id."""
    return hashlib.blake2b(encode(command), digest_size=16).hexdigest()


def reject_invalid(invalid: Invalid, now_ms: int) -> Outcome:
    """The result of a record that names a command_id but breaks the schema. Nothing is
    remembered, so a corrected command may still use the id."""
    return Outcome(
        result=Result(
            command_id=invalid.command_id,
            account=invalid.account,
            kind=invalid.kind,
            status=Status.REJECTED,
            reason=invalid.reason,
            detail=invalid.detail,
            at_ms=now_ms,
        )
    )


def apply(state: StateView, command: Command, now_ms: int) -> Outcome:
    """Decide one command against one shard's state. Deterministic: the same state,
    command and time give the same outcome."""
    digest = fingerprint(command)
    known = state.command(command.account, command.command_id)
    if known is not None:
        return _repeat(command, known, digest, now_ms)
    change = _Change(state, command, now_ms)
    try:
        _RULES[type(command)](change, command)
    except _Rejected as rejected:
        return change.rejected(rejected, digest)
    return change.applied(digest)


def _repeat(command: Command, known: CommandRecord, digest: str, now_ms: int) -> Outcome:
    if known.fingerprint != digest:
        result = Result(
            command_id=command.command_id,
            account=command.account,
            kind=kind_of(command),
            status=Status.REJECTED,
            reason=Reason.COMMAND_ID_REUSED,
            detail="this command_id was first used with a different payload",
            at_ms=now_ms,
            reference=command.reference,
            metadata=command.metadata,
        )
    else:
        result = Result(
            command_id=command.command_id,
            account=command.account,
            kind=kind_of(command),
            status=Status.DUPLICATE,
            first=FirstResult(status=known.status, reason=known.reason, at_ms=known.at_ms),
            at_ms=now_ms,
            reference=command.reference,
            metadata=command.metadata,
        )
    return Outcome(result=result)


class _Change:
    """The writes one command makes, read back by its own later reads."""

    __slots__ = ("accounts", "balances", "command", "emits", "entries", "holds", "now_ms", "state")

    def __init__(self, state: StateView, command: Command, now_ms: int) -> None:
        self.state = state
        self.command = command
        self.now_ms = now_ms
        self.balances: dict[tuple[str, str], BalanceState] = {}
        self.accounts: dict[str, AccountState] = {}
        self.holds: dict[tuple[str, str], HoldState | None] = {}
        self.emits: list[InternalCommand] = []
        self.entries: list[Entry] = []

    # Reads -----------------------------------------------------------------------------

    def balance(self, account: str, asset: str) -> BalanceState:
        found = self.balances.get((account, asset))
        if found is None:
            found = self.state.balance(account, asset)
        return ZERO if found is None else found

    def account(self, account: str) -> AccountState:
        found = self.accounts.get(account)
        if found is None:
            found = self.state.account(account)
        return ACTIVE if found is None else found

    def hold(self, account: str, hold_id: str) -> HoldState | None:
        if (account, hold_id) in self.holds:
            return self.holds[(account, hold_id)]
        return self.state.hold(account, hold_id)

    # Checks ----------------------------------------------------------------------------

    def may_pay(self, account: str) -> None:
        status = self.account(account).status
        if status == "closed":
            raise _Rejected(Reason.ACCOUNT_CLOSED)
        if status == "frozen":
            raise _Rejected(Reason.ACCOUNT_FROZEN)

    def may_receive(self, account: str) -> None:
        if self.account(account).status == "closed":
            raise _Rejected(Reason.ACCOUNT_CLOSED)

    def has_funds(self, account: str, asset: str, amount: int) -> None:
        bal = self.balance(account, asset)
        if bal.available - amount < -bal.overdraft_limit:
            raise _Rejected(
                Reason.INSUFFICIENT_FUNDS,
                f"available {bal.available}, overdraft limit {bal.overdraft_limit}, needs {amount}",
            )

    # Writes ----------------------------------------------------------------------------

    def move(
        self, account: str, asset: str, d_available: int, d_held: int, *, capped: bool = False
    ) -> None:
        """Change one balance by the deltas, bumping its seq and recording an entry.
        `capped` moves bring money from outside the balance and must keep what they
        raise under BALANCE_MAX; returns of the balance's own money are never capped."""
        bal = self.balance(account, asset)
        available = bal.available + d_available
        held = bal.held + d_held
        if capped and (
            (d_available > 0 and available > limits.BALANCE_MAX)
            or (d_held > 0 and held > limits.BALANCE_MAX)
        ):
            raise _Rejected(
                Reason.BALANCE_OVERFLOW,
                f"available {available}, held {held} would pass 2^127-1",
            )
        new = BalanceState(available, held, bal.seq + 1, bal.overdraft_limit)
        self.set_balance(account, asset, new)
        self.entries.append(
            Entry(
                account=account,
                asset=asset,
                seq=new.seq,
                available=available,
                held=held,
                delta_available=d_available,
                delta_held=d_held,
            )
        )

    def set_balance(self, account: str, asset: str, new: BalanceState) -> None:
        acct = self.account(account)
        if asset not in acct.assets:
            if len(acct.assets) >= limits.ACCOUNT_ASSETS_MAX:
                # Never met by a refund, release or expiry: their balance exists already.
                raise _Rejected(
                    Reason.TOO_MANY_ASSETS,
                    f"the account holds {len(acct.assets)} assets, the most it may",
                )
            self.accounts[account] = AccountState(acct.status, (*acct.assets, asset))
        self.balances[(account, asset)] = new

    def credit_to(self, to: str, asset: str, amount: int, leg: int | None = None) -> None:
        cmd = self.command
        self.emits.append(
            Credit(
                command_id=credit_id(cmd.account, cmd.command_id, leg),
                account=to,
                asset=asset,
                amount=amount,
                origin_command_id=_origin(cmd),
                origin_account=cmd.account,
                reference=cmd.reference,
                metadata=cmd.metadata,
            )
        )

    # Outcomes --------------------------------------------------------------------------

    def applied(self, digest: str) -> Outcome:
        result = self._result(Status.APPLIED, None, None, len(self.emits))
        return Outcome(
            result=result,
            balances=self.balances,
            accounts=self.accounts,
            holds=self.holds,
            record=CommandRecord(digest, Status.APPLIED, None, self.now_ms),
            emits=self.emits,
        )

    def rejected(self, rejected: _Rejected, digest: str) -> Outcome:
        emits: list[InternalCommand] = []
        command = self.command
        if isinstance(command, Credit):
            # The payer was already debited on its own shard: send the money back.
            emits.append(
                Refund(
                    command_id=refund_id(command.command_id),
                    account=command.origin_account,
                    asset=command.asset,
                    amount=command.amount,
                    origin_command_id=command.origin_command_id,
                    reason=rejected.reason.value,
                    reference=command.reference,
                    metadata=command.metadata,
                )
            )
        result = self._result(Status.REJECTED, rejected.reason, rejected.detail, len(emits))
        record = CommandRecord(digest, Status.REJECTED, rejected.reason, self.now_ms)
        return Outcome(result=result, record=record, emits=emits)

    def _result(
        self, status: Status, reason: Reason | None, detail: str | None, emitted: int
    ) -> Result:
        command = self.command
        return Result(
            command_id=command.command_id,
            account=command.account,
            kind=kind_of(command),
            status=status,
            reason=reason,
            detail=detail,
            entries=self.entries if status is Status.APPLIED else [],
            emitted=emitted,
            at_ms=self.now_ms,
            reference=command.reference,
            metadata=command.metadata,
        )


def _origin(command: Command) -> str:
    if isinstance(command, Credit | Refund):
        return command.origin_command_id
    return command.command_id


# Rules, one per kind. Each raises _Rejected or records its writes on the change. -------


def _deposit(c: _Change, cmd: Deposit) -> None:
    c.may_receive(cmd.account)
    c.move(cmd.account, cmd.asset, cmd.amount, 0, capped=True)


def _withdraw(c: _Change, cmd: Withdraw) -> None:
    c.may_pay(cmd.account)
    c.has_funds(cmd.account, cmd.asset, cmd.amount)
    c.move(cmd.account, cmd.asset, -cmd.amount, 0)


def _transfer(c: _Change, cmd: Transfer) -> None:
    if cmd.to == cmd.account:
        raise _Rejected(Reason.SAME_ACCOUNT, "a transfer needs two different accounts")
    c.may_pay(cmd.account)
    c.has_funds(cmd.account, cmd.asset, cmd.amount)
    c.move(cmd.account, cmd.asset, -cmd.amount, 0)
    c.credit_to(cmd.to, cmd.asset, cmd.amount)


def _disburse(c: _Change, cmd: Disburse) -> None:
    for index, leg in enumerate(cmd.legs):
        if leg.to == cmd.account:
            raise _Rejected(Reason.SAME_ACCOUNT, f"legs[{index}] pays the paying account")
    total = sum(leg.amount for leg in cmd.legs)
    if total > limits.AMOUNT_MAX:
        raise _Rejected(Reason.BALANCE_OVERFLOW, "the legs add up to more than 2^127-1")
    c.may_pay(cmd.account)
    c.has_funds(cmd.account, cmd.asset, total)
    c.move(cmd.account, cmd.asset, -total, 0)
    for index, leg in enumerate(cmd.legs):
        c.credit_to(leg.to, cmd.asset, leg.amount, index)


def _hold(c: _Change, cmd: Hold) -> None:
    c.may_pay(cmd.account)
    if c.hold(cmd.account, cmd.hold_id) is not None:
        raise _Rejected(Reason.HOLD_EXISTS)
    if cmd.expires_at_ms is not None and cmd.expires_at_ms <= c.now_ms:
        raise _Rejected(Reason.HOLD_EXPIRED, "expires_at_ms is not in the future")
    c.has_funds(cmd.account, cmd.asset, cmd.amount)
    c.move(cmd.account, cmd.asset, -cmd.amount, cmd.amount, capped=True)
    c.holds[(cmd.account, cmd.hold_id)] = HoldState(cmd.asset, cmd.amount, cmd.expires_at_ms)


def _open_hold(c: _Change, account: str, hold_id: str) -> HoldState:
    found = c.hold(account, hold_id)
    if found is None:
        raise _Rejected(Reason.HOLD_NOT_FOUND)
    return found


def _release(c: _Change, cmd: Release) -> None:
    # Releasing only gives funds back, so a frozen account may still do it.
    held = _open_hold(c, cmd.account, cmd.hold_id)
    c.move(cmd.account, held.asset, held.amount, -held.amount)
    c.holds[(cmd.account, cmd.hold_id)] = None


def _capture(c: _Change, cmd: Capture) -> None:
    if cmd.to == cmd.account:
        raise _Rejected(Reason.SAME_ACCOUNT, "capture to the holding account is a release")
    c.may_pay(cmd.account)
    held = _open_hold(c, cmd.account, cmd.hold_id)
    if held.expires_at_ms is not None and held.expires_at_ms <= c.now_ms:
        raise _Rejected(Reason.HOLD_EXPIRED)
    amount = held.amount if cmd.amount is None else cmd.amount
    if amount > held.amount:
        raise _Rejected(Reason.AMOUNT_EXCEEDS_HOLD, f"the hold is {held.amount}")
    # The captured part leaves the balance; the rest of the hold goes back to available.
    c.move(cmd.account, held.asset, held.amount - amount, -held.amount)
    c.holds[(cmd.account, cmd.hold_id)] = None
    if cmd.to is not None:
        c.credit_to(cmd.to, held.asset, amount)


def _configure(c: _Change, cmd: Configure) -> None:
    if cmd.status is None and cmd.overdraft_limit is None:
        raise _Rejected(Reason.NOTHING_TO_CONFIGURE, "give status, or asset and overdraft_limit")
    if (cmd.asset is None) != (cmd.overdraft_limit is None):
        raise _Rejected(Reason.INVALID_COMMAND, "asset and overdraft_limit go together")
    acct = c.account(cmd.account)
    if cmd.status == "closed" and acct.status != "closed":
        for asset in acct.assets:
            bal = c.balance(cmd.account, asset)
            if bal.available or bal.held:
                raise _Rejected(
                    Reason.ACCOUNT_NOT_EMPTY,
                    f"{asset}: available {bal.available}, held {bal.held}",
                )
    if cmd.status is not None:
        c.accounts[cmd.account] = AccountState(cmd.status, c.account(cmd.account).assets)
    if cmd.asset is not None and cmd.overdraft_limit is not None:
        # A limit is a setting, not a balance change: no seq bump, no entry.
        bal = c.balance(cmd.account, cmd.asset)
        new = BalanceState(bal.available, bal.held, bal.seq, cmd.overdraft_limit)
        c.set_balance(cmd.account, cmd.asset, new)


def _credit(c: _Change, cmd: Credit) -> None:
    c.may_receive(cmd.account)
    c.move(cmd.account, cmd.asset, cmd.amount, 0, capped=True)


def _refund(c: _Change, cmd: Refund) -> None:
    # A refund returns money this shard already debited: it applies whatever the
    # account's status and balance now are (never capped), or the money would vanish.
    c.move(cmd.account, cmd.asset, cmd.amount, 0)


def _expire(c: _Change, cmd: Expire) -> None:
    held = _open_hold(c, cmd.account, cmd.hold_id)
    if held.expires_at_ms is None or held.expires_at_ms > c.now_ms:
        raise _Rejected(Reason.HOLD_NOT_EXPIRED)
    c.move(cmd.account, held.asset, held.amount, -held.amount)
    c.holds[(cmd.account, cmd.hold_id)] = None


_RULES: dict[type, Callable[[_Change, Any], None]] = {
    Deposit: _deposit,
    Withdraw: _withdraw,
    Transfer: _transfer,
    Disburse: _disburse,
    Hold: _hold,
    Release: _release,
    Capture: _capture,
    Configure: _configure,
    Credit: _credit,
    Refund: _refund,
    Expire: _expire,
}
