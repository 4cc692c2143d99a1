"""Property tests of the ledger: a multi-shard world driven by a state machine and checked
against an independent model, determinism, and `apply` never raising."""

from __future__ import annotations

import copy
import tempfile
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from streams.ledger import Outcome, apply
from streams.memory import MemoryShard
from streams.store import ShardStore
from topics import limits
from topics.schema import (
    Capture,
    Command,
    Configure,
    Credit,
    Deposit,
    Disburse,
    Expire,
    FirstResult,
    Hold,
    InternalCommand,
    Leg,
    PublicCommand,
    Reason,
    Refund,
    Release,
    Result,
    Status,
    Transfer,
    Withdraw,
)
from topics.shard import shard_of

SHARDS = 4
# Six accounts spread over all four shards (erin: 0, alice and ivan: 1, bob: 2,
# frank and heidi: 3), so that both same-shard and cross-shard transfers happen.
ACCOUNTS = ("erin", "alice", "ivan", "bob", "frank", "heidi")
ASSETS = ("USD", "BTC")
HOLD_IDS = ("h0", "h1", "h2")
START_MS = 1_000_000

assert {shard_of(a, SHARDS) for a in ACCOUNTS} == set(range(SHARDS))

Key = tuple[str, str]

accounts = st.sampled_from(ACCOUNTS)
assets = st.sampled_from(ASSETS)
# Every width boundary an amount or balance can meet on the way: JavaScript's exact
# integers (2^53), signed and unsigned 64 bits, and the 128-bit amount bound itself.
BOUNDS = (1, 2**53, 2**63 - 1, 2**63, 2**64, limits.AMOUNT_MAX)
near_bounds = st.sampled_from(BOUNDS).flatmap(
    lambda b: st.integers(max(1, b - 2), min(limits.AMOUNT_MAX, b + 2))
)
small = st.integers(1, 60) | near_bounds
wide = st.integers(1, 300) | near_bounds


class LedgerWorld(RuleBasedStateMachine):
    """Four shards, commands routed by `shard_of`, internal commands queued FIFO per shard.

    The model below is written from the rules as documented, not from the ledger's code:
    it predicts every result (status and reason), every emitted internal command, every
    entry and every balance, and counts the money that entered and left.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shards = [MemoryShard() for _ in range(SHARDS)]
        self.now = START_MS
        self.inflight: dict[int, deque[InternalCommand]] = {s: deque() for s in range(SHARDS)}
        self.delivered: list[InternalCommand] = []
        self.sent: list[PublicCommand] = []
        self.counter = 0
        # The model.
        self.available: dict[Key, int] = defaultdict(int)
        self.held: dict[Key, int] = defaultdict(int)
        self.limit: dict[Key, int] = defaultdict(int)
        # The lowest `available` each balance may have now, from what the engine's own
        # balances were at the previous check (no_overdraft_beyond_the_limit).
        self.floor: dict[Key, int] = {}
        self.seq: dict[Key, int] = defaultdict(int)
        self.status: dict[str, str] = defaultdict(lambda: "active")
        self.holds: dict[Key, tuple[str, int, int | None]] = {}
        self.records: dict[tuple[str, str], tuple[Command, Status, Reason | None, int]] = {}
        self.money_in: Counter[str] = Counter()  # deposits
        self.money_out: Counter[str] = Counter()  # withdrawals and external captures
        # Bookkeeping of what the engine reported.
        self.entry_seqs: dict[Key, list[int]] = defaultdict(list)
        self.results: list[Result] = []
        self.submitted: list[Command] = []

    # Driving ---------------------------------------------------------------------------

    def next_id(self) -> str:
        self.counter += 1
        return f"c{self.counter}"

    def submit(self, command: Command) -> Outcome:
        shard_id = shard_of(command.account, SHARDS)
        shard = self.shards[shard_id]
        expected_status, expected_reason, first = self.predict(shard_id, command)
        before = copy.deepcopy(shard.__dict__)
        self.submitted.append(command)
        outcome = apply(shard, command, self.now)
        shard.commit(outcome)
        self.results.append(outcome.result)

        result = outcome.result
        assert result.at_ms == self.now
        assert (result.status, result.reason) == (expected_status, expected_reason), (
            command,
            result,
        )
        assert result.emitted == len(outcome.emits)
        for entry in result.entries:
            key = (entry.account, entry.asset)
            self.entry_seqs[key].append(entry.seq)
            assert shard_of(entry.account, SHARDS) == shard_id
            if entry.available > limits.BALANCE_MAX:
                # Shown by --hypothesis-show-statistics: the bound rule is exercised.
                event(f"{result.kind} took a balance past the cap")
        if result.reason is Reason.BALANCE_OVERFLOW:
            event(f"{result.kind} refused balance_overflow")

        if expected_status is Status.DUPLICATE:
            assert result.first == first
            assert outcome.record is None and outcome.emits == [] and result.entries == []
            assert shard.__dict__ == before, "a duplicate changed state"
            return outcome
        if expected_reason is Reason.COMMAND_ID_REUSED:
            assert outcome.record is None and outcome.emits == [] and result.entries == []
            assert shard.__dict__ == before, "a reused command_id changed state"
            return outcome

        self.records[(command.account, command.command_id)] = (
            command,
            expected_status,
            expected_reason,
            self.now,
        )
        assert shard.commands[(command.account, command.command_id)].status is expected_status
        assert shard.commands[(command.account, command.command_id)].reason is expected_reason
        if expected_status is Status.APPLIED:
            expected_entries, expected_emits = self.effect(command)
        else:
            expected_entries, expected_emits = [], self.refund_for(command, expected_reason)
        got_entries = [
            (e.account, e.asset, e.delta_available, e.delta_held, e.available, e.held, e.seq)
            for e in result.entries
        ]
        assert got_entries == expected_entries, command
        assert outcome.emits == expected_emits, command
        for emit in outcome.emits:
            self.inflight[shard_of(emit.account, SHARDS)].append(emit)
        if expected_status is Status.APPLIED:
            self.debits_stay_within_the_limit(shard, result.entries, command)
        if expected_status is Status.REJECTED:
            assert shard.balances == before["balances"]
            assert shard.holds == before["holds"]
            assert shard.accounts == before["accounts"]
        return outcome

    def debits_stay_within_the_limit(
        self, shard: MemoryShard, entries: list[Any], command: Command
    ) -> None:
        """What the engine wrote, against the limit the engine holds: every entry that
        takes `available` down ends at or above -overdraft_limit."""
        for entry in entries:
            if entry.delta_available < 0:
                bal = shard.balances[(entry.account, entry.asset)]
                assert entry.available >= -bal.overdraft_limit, (command, entry, bal)

    def send(self, command: PublicCommand) -> None:
        self.sent.append(command)
        self.submit(command)

    # The model -------------------------------------------------------------------------

    def predict(
        self, shard_id: int, command: Command
    ) -> tuple[Status, Reason | None, FirstResult | None]:
        known = self.records.get((command.account, command.command_id))
        if known is not None:
            first_command, status, reason, at_ms = known
            if first_command == command:
                return (
                    Status.DUPLICATE,
                    None,
                    FirstResult(status=status, reason=reason, at_ms=at_ms),
                )
            return Status.REJECTED, Reason.COMMAND_ID_REUSED, None
        reason = self.reason(command)
        return (Status.APPLIED if reason is None else Status.REJECTED), reason, None

    def may_pay(self, account: str) -> Reason | None:
        status = self.status[account]
        if status == "closed":
            return Reason.ACCOUNT_CLOSED
        if status == "frozen":
            return Reason.ACCOUNT_FROZEN
        return None

    def short(self, account: str, asset: str, amount: int) -> bool:
        key = (account, asset)
        return self.available[key] - amount < -self.limit[key]

    def reason(self, cmd: Command) -> Reason | None:
        a = cmd.account
        if isinstance(cmd, Deposit | Credit):
            if self.status[a] == "closed":
                return Reason.ACCOUNT_CLOSED
            # Money from outside the balance is capped; a refund (below) never is.
            over = self.available[(a, cmd.asset)] + cmd.amount > limits.BALANCE_MAX
            return Reason.BALANCE_OVERFLOW if over else None
        if isinstance(cmd, Refund):
            return None
        if isinstance(cmd, Withdraw | Transfer):
            if isinstance(cmd, Transfer) and cmd.to == a:
                return Reason.SAME_ACCOUNT
            if (r := self.may_pay(a)) is not None:
                return r
            return Reason.INSUFFICIENT_FUNDS if self.short(a, cmd.asset, cmd.amount) else None
        if isinstance(cmd, Disburse):
            if any(leg.to == a for leg in cmd.legs):
                return Reason.SAME_ACCOUNT
            total = sum(leg.amount for leg in cmd.legs)
            if total > limits.AMOUNT_MAX:
                return Reason.BALANCE_OVERFLOW
            if (r := self.may_pay(a)) is not None:
                return r
            return Reason.INSUFFICIENT_FUNDS if self.short(a, cmd.asset, total) else None
        if isinstance(cmd, Hold):
            if (r := self.may_pay(a)) is not None:
                return r
            if (a, cmd.hold_id) in self.holds:
                return Reason.HOLD_EXISTS
            if cmd.expires_at_ms is not None and cmd.expires_at_ms <= self.now:
                return Reason.HOLD_EXPIRED
            if self.short(a, cmd.asset, cmd.amount):
                return Reason.INSUFFICIENT_FUNDS
            over = self.held[(a, cmd.asset)] + cmd.amount > limits.BALANCE_MAX
            return Reason.BALANCE_OVERFLOW if over else None
        if isinstance(cmd, Release):
            return None if (a, cmd.hold_id) in self.holds else Reason.HOLD_NOT_FOUND
        if isinstance(cmd, Expire):
            found = self.holds.get((a, cmd.hold_id))
            if found is None:
                return Reason.HOLD_NOT_FOUND
            expires = found[2]
            return None if expires is not None and expires <= self.now else Reason.HOLD_NOT_EXPIRED
        if isinstance(cmd, Capture):
            if cmd.to == a:
                return Reason.SAME_ACCOUNT
            if (r := self.may_pay(a)) is not None:
                return r
            found = self.holds.get((a, cmd.hold_id))
            if found is None:
                return Reason.HOLD_NOT_FOUND
            if found[2] is not None and found[2] <= self.now:
                return Reason.HOLD_EXPIRED
            if cmd.amount is not None and cmd.amount > found[1]:
                return Reason.AMOUNT_EXCEEDS_HOLD
            return None
        assert isinstance(cmd, Configure)
        if cmd.status is None and cmd.overdraft_limit is None:
            return Reason.NOTHING_TO_CONFIGURE
        if (cmd.asset is None) != (cmd.overdraft_limit is None):
            return Reason.INVALID_COMMAND
        if cmd.status == "closed" and self.status[a] != "closed":
            for asset in ASSETS:
                if self.available[(a, asset)] or self.held[(a, asset)]:
                    return Reason.ACCOUNT_NOT_EMPTY
        return None

    def move(
        self, entries: list[tuple[Any, ...]], account: str, asset: str, d_av: int, d_held: int
    ) -> None:
        key = (account, asset)
        self.available[key] += d_av
        self.held[key] += d_held
        self.seq[key] += 1
        entries.append(
            (account, asset, d_av, d_held, self.available[key], self.held[key], self.seq[key])
        )

    def credit(self, cmd: Command, to: str, asset: str, amount: int, suffix: str) -> Credit:
        return Credit(
            command_id=f"{cmd.account}/{cmd.command_id}/{suffix}",
            account=to,
            asset=asset,
            amount=amount,
            origin_command_id=cmd.command_id,
            origin_account=cmd.account,
        )

    def refund_for(self, cmd: Command, reason: Reason | None) -> list[InternalCommand]:
        if not isinstance(cmd, Credit):
            return []
        assert reason is not None
        return [
            Refund(
                command_id=f"{cmd.command_id}/refund",
                account=cmd.origin_account,
                asset=cmd.asset,
                amount=cmd.amount,
                origin_command_id=cmd.origin_command_id,
                reason=reason.value,
            )
        ]

    def effect(self, cmd: Command) -> tuple[list[tuple[Any, ...]], list[InternalCommand]]:
        """Apply an accepted command to the model; return the entries and emits it implies."""
        entries: list[tuple[Any, ...]] = []
        emits: list[InternalCommand] = []
        a = cmd.account
        if isinstance(cmd, Deposit):
            self.move(entries, a, cmd.asset, cmd.amount, 0)
            self.money_in[cmd.asset] += cmd.amount
        elif isinstance(cmd, Credit | Refund):
            self.move(entries, a, cmd.asset, cmd.amount, 0)
        elif isinstance(cmd, Withdraw):
            self.move(entries, a, cmd.asset, -cmd.amount, 0)
            self.money_out[cmd.asset] += cmd.amount
        elif isinstance(cmd, Transfer):
            self.move(entries, a, cmd.asset, -cmd.amount, 0)
            emits.append(self.credit(cmd, cmd.to, cmd.asset, cmd.amount, "credit"))
        elif isinstance(cmd, Disburse):
            self.move(entries, a, cmd.asset, -sum(leg.amount for leg in cmd.legs), 0)
            for i, leg in enumerate(cmd.legs):
                emits.append(self.credit(cmd, leg.to, cmd.asset, leg.amount, f"credit/{i}"))
        elif isinstance(cmd, Hold):
            self.move(entries, a, cmd.asset, -cmd.amount, cmd.amount)
            self.holds[(a, cmd.hold_id)] = (cmd.asset, cmd.amount, cmd.expires_at_ms)
        elif isinstance(cmd, Release | Expire):
            asset, amount, _ = self.holds.pop((a, cmd.hold_id))
            self.move(entries, a, asset, amount, -amount)
        elif isinstance(cmd, Capture):
            asset, held, _ = self.holds.pop((a, cmd.hold_id))
            taken = held if cmd.amount is None else cmd.amount
            self.move(entries, a, asset, held - taken, -held)
            if cmd.to is None:
                self.money_out[asset] += taken
            else:
                emits.append(self.credit(cmd, cmd.to, asset, taken, "credit"))
        else:
            assert isinstance(cmd, Configure)
            if cmd.status is not None:
                self.status[a] = cmd.status
            if cmd.asset is not None and cmd.overdraft_limit is not None:
                self.limit[(a, cmd.asset)] = cmd.overdraft_limit
        return entries, emits

    # Rules -----------------------------------------------------------------------------

    @rule(ms=st.integers(1, 4000))
    def advance_time(self, ms: int) -> None:
        self.now += ms

    @precondition(
        lambda self: any(h[2] is not None and h[2] > self.now for h in self.holds.values())
    )
    @rule(data=st.data())
    def advance_to_an_expiry(self, data: st.DataObject) -> None:
        """Time lands exactly on a hold's expiry: the boundary of hold_expired/expire."""
        pending = sorted(h[2] for h in self.holds.values() if h[2] is not None and h[2] > self.now)
        self.now = data.draw(st.sampled_from(pending))

    @rule(account=accounts, asset=assets, amount=wide)
    def deposit(self, account: str, asset: str, amount: int) -> None:
        self.send(Deposit(command_id=self.next_id(), account=account, asset=asset, amount=amount))

    @rule(data=st.data(), over=st.integers(0, 1))
    def fill_to_the_cap(self, data: st.DataObject, over: int) -> None:
        """A deposit that takes a balance exactly to BALANCE_MAX (or one past it), so that
        refunds and releases on their way back meet a full balance (often a balance with
        an open hold, whose release or capture then lands on it)."""
        account, asset = data.draw(accounts), data.draw(assets)
        if self.holds and data.draw(st.booleans()):
            account, hold_id = data.draw(st.sampled_from(sorted(self.holds)))
            asset = self.holds[(account, hold_id)][0]
        room = limits.BALANCE_MAX - self.available[(account, asset)] + over
        if 1 <= room <= limits.AMOUNT_MAX:
            self.deposit(account, asset, room)

    @precondition(lambda self: any(s == "closed" for s in self.status.values()))
    @rule(data=st.data())
    def transfer_to_a_closed_account(self, data: st.DataObject) -> None:
        """A credit that will be refused and refunded: the refund is what must always
        apply, whatever the payer's balance has become meanwhile."""
        account, asset, amount = self.pick_payer(data)
        closed = sorted(a for a, s in self.status.items() if s == "closed" and a != account)
        if closed:
            to = data.draw(st.sampled_from(closed))
            self.send(
                Transfer(
                    command_id=self.next_id(), account=account, to=to, asset=asset, amount=amount
                )
            )

    @initialize(amounts=st.lists(st.integers(0, 400) | near_bounds, min_size=12, max_size=12))
    def opening_balances(self, amounts: list[int]) -> None:
        keys = [(a, asset) for a in ACCOUNTS for asset in ASSETS]
        for (account, asset), amount in zip(keys, amounts, strict=True):
            if amount:
                self.deposit(account, asset, amount)

    def pick_payer(self, data: st.DataObject) -> tuple[str, str, int]:
        """Mostly a payer with funds and an amount it can (nearly) afford; sometimes any."""
        funded = sorted(k for k, v in self.available.items() if v + self.limit[k] > 0)
        if funded and data.draw(st.integers(0, 3)) != 0:
            account, asset = data.draw(st.sampled_from(funded))
            room = self.available[(account, asset)] + self.limit[(account, asset)]
            return account, asset, data.draw(st.integers(1, min(room + 2, limits.AMOUNT_MAX)))
        return data.draw(accounts), data.draw(assets), data.draw(small)

    def payee(self, data: st.DataObject, payer: str) -> str:
        """Mostly another account, sometimes the payer itself (same_account)."""
        if data.draw(st.integers(0, 7)):
            return data.draw(st.sampled_from([a for a in ACCOUNTS if a != payer]))
        return payer

    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        account, asset, amount = self.pick_payer(data)
        self.send(Withdraw(command_id=self.next_id(), account=account, asset=asset, amount=amount))

    @rule(data=st.data())
    def transfer(self, data: st.DataObject) -> None:
        account, asset, amount = self.pick_payer(data)
        to = self.payee(data, account)
        self.send(
            Transfer(command_id=self.next_id(), account=account, to=to, asset=asset, amount=amount)
        )

    @rule(data=st.data(), n_legs=st.integers(1, 4))
    def disburse(self, data: st.DataObject, n_legs: int) -> None:
        account, asset, amount = self.pick_payer(data)
        legs = [
            Leg(to=self.payee(data, account), amount=max(1, amount // n_legs))
            for _ in range(n_legs)
        ]
        self.send(Disburse(command_id=self.next_id(), account=account, asset=asset, legs=legs))

    @rule(
        data=st.data(),
        hold_id=st.sampled_from(HOLD_IDS),
        expires_in=st.none() | st.integers(-200, 6000),
    )
    def hold(self, data: st.DataObject, hold_id: str, expires_in: int | None) -> None:
        account, asset, amount = self.pick_payer(data)
        expires = None if expires_in is None else max(0, self.now + expires_in)
        self.send(
            Hold(
                command_id=self.next_id(),
                account=account,
                hold_id=hold_id,
                asset=asset,
                amount=amount,
                expires_at_ms=expires,
            )
        )

    def pick_hold(self, data: st.DataObject) -> tuple[str, str]:
        """Mostly an open hold of the model, sometimes any (account, hold_id)."""
        if self.holds and data.draw(st.integers(0, 4)) != 0:
            return data.draw(st.sampled_from(sorted(self.holds)))
        return data.draw(accounts), data.draw(st.sampled_from(HOLD_IDS))

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        account, hold_id = self.pick_hold(data)
        self.send(Release(command_id=self.next_id(), account=account, hold_id=hold_id))

    @rule(data=st.data(), whole=st.booleans(), to=st.none() | accounts)
    def capture(self, data: st.DataObject, whole: bool, to: str | None) -> None:
        account, hold_id = self.pick_hold(data)
        found = self.holds.get((account, hold_id))
        # None (the whole hold), or a part, all, or a little more than the hold.
        most = min((found[1] if found else 40) + 2, limits.AMOUNT_MAX)
        amount = None if whole else data.draw(st.integers(1, most))
        self.send(
            Capture(
                command_id=self.next_id(), account=account, hold_id=hold_id, amount=amount, to=to
            )
        )

    @rule(
        account=accounts,
        shape=st.sampled_from(
            ["status", "status", "status", "limit", "limit", "both", "none", "asset", "limit_only"]
        ),
        status=st.sampled_from(["active", "active", "frozen", "closed"]),
        asset=assets,
        overdraft_limit=st.integers(0, 80) | near_bounds,
    )
    def configure(
        self, account: str, shape: str, status: str, asset: str, overdraft_limit: int
    ) -> None:
        shapes: dict[str, dict[str, Any]] = {
            "status": {"status": status},
            "limit": {"asset": asset, "overdraft_limit": overdraft_limit},
            "both": {"status": status, "asset": asset, "overdraft_limit": overdraft_limit},
            "none": {},
            "asset": {"status": status, "asset": asset},  # invalid: asset without a limit
            "limit_only": {"overdraft_limit": overdraft_limit},  # invalid: no asset
        }
        self.send(Configure(command_id=self.next_id(), account=account, **shapes[shape]))

    @rule(account=accounts)
    def empty_and_close(self, account: str) -> None:
        """Withdraw what the account has and close it, so that closed accounts (and the
        credits they refuse and the refunds those cause) are common enough."""
        for asset in ASSETS:
            # A balance past the cap (refunds) takes more than one withdrawal.
            while (amount := min(self.available[(account, asset)], limits.AMOUNT_MAX)) > 0:
                withdraw = Withdraw(
                    command_id=self.next_id(), account=account, asset=asset, amount=amount
                )
                if self.submit(withdraw).result.status is not Status.APPLIED:
                    break
                self.sent.append(withdraw)
        self.send(Configure(command_id=self.next_id(), account=account, status="closed"))

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data(), same_payload=st.booleans())
    def repeat(self, data: st.DataObject, same_payload: bool) -> None:
        """A client retry (same payload) or a reused command_id on the same account.

        Reuse across accounts (and so across shards) is tested on its own below."""
        original = data.draw(st.sampled_from(self.sent))
        if same_payload:
            self.submit(original)
            return
        other: PublicCommand = Deposit(
            command_id=original.command_id, account=original.account, asset="USD", amount=7
        )
        if other == original:
            other = msgspec.structs.replace(other, amount=8)
        self.submit(other)

    @precondition(lambda self: any(self.inflight.values()))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        busy = [s for s, queue in self.inflight.items() if queue]
        shard_id = data.draw(st.sampled_from(busy))
        command = self.inflight[shard_id].popleft()
        self.delivered.append(command)
        self.submit(command)

    @precondition(lambda self: bool(self.delivered))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """At-least-once delivery of the internal topic: a repeat must be a duplicate."""
        command = data.draw(st.sampled_from(self.delivered))
        assert self.submit(command).result.status is Status.DUPLICATE

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        """What the engine's timer does for holds past expiry (and, to test the check,
        sometimes for holds that are not)."""
        expired = sorted(k for k, h in self.holds.items() if h[2] is not None and h[2] <= self.now)
        pool = expired or sorted(self.holds)
        account, hold_id = data.draw(st.sampled_from(pool))
        self.submit(Expire(command_id=f"expire.{self.next_id()}", account=account, hold_id=hold_id))

    # Invariants ------------------------------------------------------------------------

    def all_balances(self) -> dict[Key, Any]:
        found: dict[Key, Any] = {}
        for shard_id, shard in enumerate(self.shards):
            for key, bal in shard.balances.items():
                assert shard_of(key[0], SHARDS) == shard_id, f"{key} on the wrong shard"
                found[key] = bal
        return found

    @invariant()
    def balances_match_the_model(self) -> None:
        balances = self.all_balances()
        for account in ACCOUNTS:
            for asset in ASSETS:
                key = (account, asset)
                bal = balances.get(key)
                got = (0, 0, 0, 0) if bal is None else tuple(msgspec.structs.astuple(bal))
                want = (self.available[key], self.held[key], self.seq[key], self.limit[key])
                assert got == want, (key, got, want)

    @invariant()
    def no_overdraft_beyond_the_limit(self) -> None:
        """`available` may be below -limit only where it already was: a limit lowered
        under an overdraft leaves the overdraft, and credits only raise it. So the floor
        is the lower of -limit and where the balance stood at the previous step, and it
        tightens as soon as the balance rises or the limit is raised."""
        for key, bal in self.all_balances().items():
            floor = min(-bal.overdraft_limit, self.floor.get(key, 0))
            assert bal.available >= floor, (key, bal, floor)
            assert bal.held >= 0, key
            self.floor[key] = min(-bal.overdraft_limit, bal.available)

    @invariant()
    def held_is_the_sum_of_open_holds(self) -> None:
        open_holds: Counter[Key] = Counter()
        found: dict[Key, tuple[str, int, int | None]] = {}
        for shard_id, shard in enumerate(self.shards):
            for (account, hold_id), hold in shard.holds.items():
                assert shard_of(account, SHARDS) == shard_id
                assert hold.amount > 0
                open_holds[(account, hold.asset)] += hold.amount
                found[(account, hold_id)] = (hold.asset, hold.amount, hold.expires_at_ms)
        assert found == self.holds
        for key, bal in self.all_balances().items():
            assert bal.held == open_holds[key], key

    @invariant()
    def seq_counts_every_entry_without_gaps(self) -> None:
        balances = self.all_balances()
        for key, seqs in self.entry_seqs.items():
            assert seqs == list(range(1, len(seqs) + 1)), key
            assert balances[key].seq == len(seqs), key
        for key, bal in balances.items():
            assert bal.seq == len(self.entry_seqs.get(key, [])), key

    @invariant()
    def money_is_conserved(self) -> None:
        in_flight: Counter[str] = Counter()
        for queue in self.inflight.values():
            for command in queue:
                assert isinstance(command, Credit | Refund)
                in_flight[command.asset] += command.amount
        held_by_accounts: Counter[str] = Counter()
        for (_, asset), bal in self.all_balances().items():
            held_by_accounts[asset] += bal.available + bal.held
        for asset in ASSETS:
            expected = self.money_in[asset] - self.money_out[asset]
            if not in_flight[asset]:
                # Quiescent for this asset: balances alone account for all the money.
                assert held_by_accounts[asset] == expected, asset
            assert held_by_accounts[asset] + in_flight[asset] == expected, asset

    @invariant()
    def every_command_got_one_result_and_no_emit_is_lost(self) -> None:
        """Each command submitted got one result, its own, in order; and every internal
        command the results announce (by the id rules of `Result`'s docstring, not by
        the emits the harness queued) was answered exactly once or is still queued."""
        answered = [(r.command_id, r.account, r.kind) for r in self.results]
        asked = [(c.command_id, c.account, type(c).__struct_config__.tag) for c in self.submitted]
        assert answered == asked
        announced: Counter[str] = Counter()
        for r in self.results:
            if r.kind in ("transfer", "capture") and r.emitted:
                assert r.emitted == 1, r
                announced[f"{r.account}/{r.command_id}/credit"] += 1
            elif r.kind == "disburse":
                announced.update(f"{r.account}/{r.command_id}/credit/{i}" for i in range(r.emitted))
            elif r.kind == "credit" and r.emitted:
                assert r.emitted == 1 and r.status is Status.REJECTED, r
                announced[f"{r.command_id}/refund"] += 1
            else:
                assert r.emitted == 0, r
        reached = Counter(
            r.command_id
            for r in self.results
            if r.kind in ("credit", "refund") and r.status is not Status.DUPLICATE
        )
        reached.update(c.command_id for q in self.inflight.values() for c in q)
        assert reached == announced

    def teardown(self) -> None:
        # Drain: deliver everything still in flight, then everything is quiescent.
        while any(self.inflight.values()):
            for shard_id in range(SHARDS):
                if self.inflight[shard_id]:
                    command = self.inflight[shard_id].popleft()
                    self.delivered.append(command)
                    self.submit(command)
        self.money_is_conserved()
        self.balances_match_the_model()
        self.no_overdraft_beyond_the_limit()
        self.every_command_got_one_result_and_no_emit_is_lost()


LedgerWorld.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLedgerWorld = LedgerWorld.TestCase


def test_the_overdraft_floor_tightens_once_a_lowered_limit_is_paid_back() -> None:
    """The invariant itself: a limit lowered under an overdraft leaves that overdraft,
    but once credits raise the balance, a debit below the new limit is a violation.
    (The floor used to be set once, when the limit was lowered, and never tightened.)"""
    world = LedgerWorld()
    world.configure("bob", "limit", "active", "USD", 100)
    world.send(Withdraw(command_id=world.next_id(), account="bob", asset="USD", amount=50))
    world.no_overdraft_beyond_the_limit()
    world.configure("bob", "limit", "active", "USD", 10)
    world.no_overdraft_beyond_the_limit()  # -50 under a limit of 10: allowed, it was there
    world.deposit("bob", "USD", 100)
    world.no_overdraft_beyond_the_limit()
    shard = world.shards[shard_of("bob", SHARDS)]
    bal = shard.balances[("bob", "USD")]
    # What a ledger that let a debit through to -40 would leave behind.
    shard.balances[("bob", "USD")] = msgspec.structs.replace(bal, available=-40)
    try:
        world.no_overdraft_beyond_the_limit()
    except AssertionError:
        return
    raise AssertionError("an overdraft of 40 under a limit of 10 went unnoticed")


# Cross-shard command_id reuse ---------------------------------------------------------


def test_command_id_reused_across_shards_conserves_money() -> None:
    """Two payers on different shards use the same command_id for transfers to payees on
    one shard. Each payer's shard only knows its own ids, so both transfers are debited;
    both credits are then "<id>/credit" on the payee's shard. The second must not simply
    vanish: either it is applied or its money is refunded."""
    payer_a, payer_b, payee_1, payee_2 = "alice", "bob", "frank", "heidi"
    assert shard_of(payer_a, SHARDS) != shard_of(payer_b, SHARDS)
    assert shard_of(payee_1, SHARDS) == shard_of(payee_2, SHARDS)
    shards = [MemoryShard() for _ in range(SHARDS)]

    def run(command: Command) -> Outcome:
        shard = shards[shard_of(command.account, SHARDS)]
        outcome = apply(shard, command, START_MS)
        shard.commit(outcome)
        return outcome

    queue: deque[InternalCommand] = deque()
    for payer, payee in ((payer_a, payee_1), (payer_b, payee_2)):
        run(Deposit(command_id=f"seed-{payer}", account=payer, asset="USD", amount=100))
        out = run(Transfer(command_id="order-1", account=payer, to=payee, asset="USD", amount=30))
        assert out.result.status is Status.APPLIED
        queue.extend(out.emits)
    while queue:
        queue.extend(run(queue.popleft()).emits)

    total = sum(b.available + b.held for s in shards for b in s.balances.values())
    assert total == 200, f"money destroyed: {200 - total}"


# Determinism --------------------------------------------------------------------------

ids = st.sampled_from(["a", "b", "c", "d", "e", "f"]) | st.from_regex(
    limits.COMMAND_ID_PATTERN, fullmatch=True
)
small_accounts = st.sampled_from(["alice", "bob", "carol"])
amounts = st.integers(1, 100) | near_bounds | st.integers(1, limits.AMOUNT_MAX)
maybe_assets = st.sampled_from(["USD", "BTC"])
hold_ids = st.sampled_from(["h1", "h2"])
times = st.integers(0, 10_000)


def commands(
    account_ids: st.SearchStrategy[str] = small_accounts,
    command_ids: st.SearchStrategy[str] = ids,
    amount: st.SearchStrategy[int] = amounts,
    asset: st.SearchStrategy[str] = maybe_assets,
) -> st.SearchStrategy[Command]:
    """Every command kind, public and internal, built field by field from the schema."""
    internal_ids = st.builds(
        lambda cid, suffix: f"{cid}/{suffix}",
        command_ids,
        st.sampled_from(["credit", "refund", "credit/0", "credit/1/refund"]),
    )
    common: dict[str, Any] = {"command_id": command_ids, "account": account_ids}
    internal: dict[str, Any] = {"command_id": internal_ids, "account": account_ids}
    limit = st.none() | st.integers(0, limits.LIMIT_MAX) | st.integers(0, 100) | near_bounds
    return st.one_of(
        st.builds(Deposit, **common, asset=asset, amount=amount),
        st.builds(Withdraw, **common, asset=asset, amount=amount),
        st.builds(Transfer, **common, to=account_ids, asset=asset, amount=amount),
        st.builds(
            Disburse,
            **common,
            asset=asset,
            legs=st.lists(st.builds(Leg, to=account_ids, amount=amount), min_size=1, max_size=5),
        ),
        st.builds(
            Hold,
            **common,
            hold_id=hold_ids,
            asset=asset,
            amount=amount,
            expires_at_ms=st.none() | times | st.integers(0, limits.INT64_MAX),
        ),
        st.builds(Release, **common, hold_id=hold_ids),
        st.builds(
            Capture,
            **common,
            hold_id=hold_ids,
            amount=st.none() | amount,
            to=st.none() | account_ids,
        ),
        st.builds(
            Configure,
            **common,
            status=st.none() | st.sampled_from(["active", "frozen", "closed"]),
            asset=st.none() | asset,
            overdraft_limit=limit,
        ),
        st.builds(
            Credit,
            **internal,
            asset=asset,
            amount=amount,
            origin_command_id=command_ids,
            origin_account=account_ids,
        ),
        st.builds(
            Refund,
            **internal,
            asset=asset,
            amount=amount,
            origin_command_id=command_ids,
            reason=st.sampled_from([r.value for r in Reason]),
        ),
        st.builds(Expire, **internal, hold_id=hold_ids),
    )


def run_all(
    shard: MemoryShard | ShardStore, script: list[tuple[Command, int]], flush_every: int = 0
) -> list[Outcome]:
    """Apply and commit each command; a ShardStore is flushed to RocksDB every
    `flush_every` commands (the engine's batches), so that later reads come from disk."""
    outcomes = []
    for index, (command, now) in enumerate(script, 1):
        outcome = apply(shard, command, now)
        shard.commit(outcome)
        outcomes.append(outcome)
        if isinstance(shard, ShardStore) and flush_every and index % flush_every == 0:
            shard.flush(index)
    return outcomes


def state_of(store: ShardStore) -> dict[str, Any]:
    """A flushed RocksDB shard in MemoryShard's shape, read back through its decoders."""
    out: dict[str, Any] = {
        "balances": {(a, asset): bal for a, asset, bal in store.balances()},
        "holds": {(a, h): held for a, h, held in store.open_holds()},
        "commands": dict(store.commands_from(None, 10_000)[0]),
    }
    accounts = {a for a, _ in out["balances"]} | {a for a, _ in out["holds"]}
    found = {a: store.account(a) for a in accounts}
    out["accounts"] = {a: acct for a, acct in found.items() if acct is not None}
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(commands(), times), max_size=40))
def test_same_commands_give_same_results_and_state(script: list[tuple[Command, int]]) -> None:
    one, two = MemoryShard(), MemoryShard()
    first = run_all(one, script)
    second = run_all(two, script)
    assert [o.result for o in first] == [o.result for o in second]
    assert [o.emits for o in first] == [o.emits for o in second]
    assert [o.record for o in first] == [o.record for o in second]
    assert one.__dict__ == two.__dict__
    # Results are wire-stable too: the same bytes.
    from topics.codec import encode

    assert [encode(o.result) for o in first] == [encode(o.result) for o in second]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(commands(), times), max_size=40), st.integers(1, 7))
def test_rocksdb_shard_gives_the_same_results_and_state_as_memory(
    script: list[tuple[Command, int]], flush_every: int
) -> None:
    """The engine's own store: the same script on a RocksDB ShardStore (flushed in
    batches, so that reads come from its encodings on disk as well as from the staged
    batch) answers exactly as the in-memory shard and ends in the same state."""
    memory = MemoryShard()
    expected = run_all(memory, script)
    with tempfile.TemporaryDirectory() as tmp:
        store = ShardStore(Path(tmp) / "shard", "changelog")
        try:
            got = run_all(store, script, flush_every)
            store.flush(len(script))
            assert [o.result for o in got] == [o.result for o in expected]
            assert [o.emits for o in got] == [o.emits for o in expected]
            assert state_of(store) == {
                "balances": memory.balances,
                "holds": memory.holds,
                "commands": memory.commands,
                "accounts": {
                    a: acct
                    for a, acct in memory.accounts.items()
                    if any(k[0] == a for k in (*memory.balances, *memory.holds))
                },
            }
        finally:
            store.close()


# Never raises ---------------------------------------------------------------------------


def seeded_shard() -> MemoryShard:
    """A shard with state near every edge: a balance at the cap, an overdrawn balance,
    open holds with and without expiry, frozen and closed accounts, known command ids."""
    shard = MemoryShard()
    script: list[Command] = [
        Deposit(command_id="a", account="alice", asset="USD", amount=limits.AMOUNT_MAX),
        Configure(command_id="b", account="bob", asset="USD", overdraft_limit=limits.AMOUNT_MAX),
        Withdraw(command_id="c", account="bob", asset="USD", amount=limits.AMOUNT_MAX),
        Deposit(command_id="d", account="carol", asset="BTC", amount=100),
        Hold(command_id="e", account="carol", hold_id="h1", asset="BTC", amount=40),
        Hold(
            command_id="f",
            account="carol",
            hold_id="h2",
            asset="BTC",
            amount=10,
            expires_at_ms=5_000,
        ),
        Configure(command_id="g", account="carol", status="frozen"),
        Configure(command_id="h", account="dave", status="closed"),
    ]
    for command in script:
        outcome = apply(shard, command, 0)
        assert outcome.result.status is Status.APPLIED, outcome.result
        shard.commit(outcome)
    return shard


edge_accounts = st.sampled_from(["alice", "bob", "carol", "dave"]) | st.from_regex(
    limits.ACCOUNT_ID_PATTERN, fullmatch=True
)
edge_assets = st.sampled_from(["USD", "BTC"]) | st.from_regex(limits.ASSET_PATTERN, fullmatch=True)
edge_amounts = st.sampled_from([1, limits.AMOUNT_MAX, limits.AMOUNT_MAX - 1]) | st.integers(
    1, limits.AMOUNT_MAX
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(commands(edge_accounts, ids, edge_amounts, edge_assets), times),
        min_size=1,
        max_size=8,
    )
)
def test_apply_never_raises_and_answers_well_formed(script: list[tuple[Command, int]]) -> None:
    shard = seeded_shard()
    for command, now in script:
        outcome = apply(shard, command, now)
        result = outcome.result
        assert result.command_id == command.command_id
        assert result.account == command.account
        assert result.status in (Status.APPLIED, Status.REJECTED, Status.DUPLICATE)
        assert (result.reason is None) == (result.status is not Status.REJECTED)
        assert (result.first is not None) == (result.status is Status.DUPLICATE)
        if result.status is not Status.APPLIED:
            assert result.entries == [] and outcome.balances == {} and outcome.holds == {}
        assert result.emitted == len(outcome.emits)
        shard.commit(outcome)
        for bal in shard.balances.values():
            # Refunds and releases may take `available` past the cap; nothing else may.
            assert bal.available >= limits.BALANCE_MIN
            assert 0 <= bal.held <= limits.BALANCE_MAX
        for entry in result.entries:
            assert shard.balances[(entry.account, entry.asset)].seq >= entry.seq
