"""Conservation, the one definition (topics.money): random histories of every kind of
money movement, run through the ledger rules on several shards, conserve money by it
exactly when nothing is in flight; and a history with money planted, lost or taken for
paid out is caught."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.ledger import apply
from streams.memory import MemoryShard
from topics.money import AssetFlow, Flow, conservation, flow_of, flows_of, holdings
from topics.schema import (
    Capture,
    Command,
    Configure,
    Deposit,
    Disburse,
    Entry,
    Hold,
    InternalCommand,
    Leg,
    Release,
    Result,
    Status,
    Transfer,
    Withdraw,
)
from topics.shard import shard_of

SHARDS = 3
ACCOUNTS = ("alice", "bob", "carol", "dave", "erin")
ASSETS = ("USD", "EUR")
NOW_MS = 1_000_000


def _shards(n: int) -> list[MemoryShard]:
    return [MemoryShard() for _ in range(n)]


@dataclass
class World:
    """Shards running the real ledger rules, the internal commands in flight, and an
    independent count of the money that came in and went out."""

    shards: list[MemoryShard] = field(
        default_factory=lambda: [MemoryShard() for _ in range(SHARDS)]
    )
    in_flight: deque[InternalCommand] = field(default_factory=deque)
    results: list[Result] = field(default_factory=list)
    holds: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)  # asset, amount
    money_in: Counter[str] = field(default_factory=Counter)
    money_out: Counter[str] = field(default_factory=Counter)

    def submit(self, command: Command) -> Result:
        shard = self.shards[shard_of(command.account, SHARDS)]
        outcome = apply(shard, command, NOW_MS)
        shard.commit(outcome)
        self.results.append(outcome.result)
        self.in_flight.extend(outcome.emits)
        if outcome.result.status is Status.APPLIED:
            self._count(command)
        return outcome.result

    def _count(self, command: Command) -> None:
        """What the rules say enters and leaves, from the commands (not the entries)."""
        if isinstance(command, Deposit):
            self.money_in[command.asset] += command.amount
        elif isinstance(command, Withdraw):
            self.money_out[command.asset] += command.amount
        elif isinstance(command, Hold):
            self.holds[(command.account, command.hold_id)] = (command.asset, command.amount)
        elif isinstance(command, Release):
            self.holds.pop((command.account, command.hold_id))
        elif isinstance(command, Capture):
            asset, held = self.holds.pop((command.account, command.hold_id))
            if command.to is None:
                self.money_out[asset] += command.amount or held

    def deliver(self, count: int | None = None) -> None:
        n = 0
        while self.in_flight and (count is None or n < count):
            self.submit(self.in_flight.popleft())
            n += 1

    def balances(self) -> Counter[str]:
        return holdings(
            (asset, b.available, b.held)
            for shard in self.shards
            for (_, asset), b in shard.balances.items()
        )

    def flows(self) -> list[AssetFlow]:
        return conservation(self.balances(), flows_of(self.results))


accounts = st.sampled_from(ACCOUNTS)
assets = st.sampled_from(ASSETS)
amounts = st.integers(1, 50)
# Holds on two accounts only, so that releases and captures often find one open.
holders = st.sampled_from(("alice", "bob"))
hold_ids = st.sampled_from(("h1", "h2"))
payees = st.none() | accounts


def _steps(draw: st.DrawFn, n: int) -> list[Command]:
    """One command, or (kind "settle") a deposit, a hold of it and its capture, to an
    account or out of the system, so that captures are common."""
    kind = draw(st.sampled_from(("deposit", "withdraw", "transfer", "disburse", "hold",
                                 "release", "capture", "close", "settle")))  # fmt: skip
    if kind != "settle":
        return [_step(draw, n, kind)]
    account, asset, amount = draw(holders), draw(assets), draw(amounts)
    hold_id = f"s{n}"
    return [
        Deposit(command_id=f"c{n}.d", account=account, asset=asset, amount=amount),
        Hold(command_id=f"c{n}.h", account=account, hold_id=hold_id, asset=asset,
             amount=amount),
        Capture(command_id=f"c{n}.c", account=account, hold_id=hold_id,
                amount=draw(st.none() | st.integers(1, amount)), to=draw(payees)),
    ]  # fmt: skip


def _step(draw: st.DrawFn, n: int, kind: str) -> Command:
    account, asset, amount = draw(accounts), draw(assets), draw(amounts)
    cid = f"c{n}"
    if kind in ("hold", "release", "capture"):
        account = draw(holders)
    if kind == "deposit":
        return Deposit(command_id=cid, account=account, asset=asset, amount=amount * 3)
    if kind == "withdraw":
        return Withdraw(command_id=cid, account=account, asset=asset, amount=amount)
    if kind == "transfer":
        return Transfer(command_id=cid, account=account, to=draw(accounts), asset=asset,
                        amount=amount)  # fmt: skip
    if kind == "disburse":
        legs = draw(st.lists(st.builds(Leg, to=accounts, amount=amounts), min_size=1, max_size=3))
        return Disburse(command_id=cid, account=account, asset=asset, legs=legs)
    if kind == "hold":
        return Hold(command_id=cid, account=account, hold_id=draw(hold_ids), asset=asset,
                    amount=amount)  # fmt: skip
    if kind == "release":
        return Release(command_id=cid, account=account, hold_id=draw(hold_ids))
    if kind == "capture":
        part = draw(st.none() | st.integers(1, 10))
        return Capture(command_id=cid, account=account, hold_id=draw(hold_ids), amount=part,
                       to=draw(payees))  # fmt: skip
    # A closed account refuses credits: their refunds travel back to the payer.
    return Configure(command_id=cid, account=account, status="closed")


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Command], list[int]]:
    """Commands, and after each how many internal commands are delivered (some stay in
    flight until the end)."""
    commands = [c for i in range(draw(st.integers(1, 30))) for c in _steps(draw, i)]
    n = len(commands)
    deliveries = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    return commands, deliveries


def _in_flight(world: World) -> Counter[str]:
    out: Counter[str] = Counter()
    for command in world.in_flight:
        out[command.asset] += command.amount
    return out


@settings(max_examples=300, deadline=None, database=None)
@given(histories())
def test_money_is_conserved_exactly_when_nothing_is_in_flight(
    history: tuple[list[Command], list[int]],
) -> None:
    world = World()
    for command, deliver in zip(*history, strict=True):
        world.submit(command)
        world.deliver(deliver)
        in_flight = _in_flight(world)
        for f in world.flows():
            # What is on its way between shards is missing from the internal net.
            assert f.internal == -in_flight[f.asset], f
            assert f.ok == (in_flight[f.asset] == 0), f
    world.deliver()
    flows = world.flows()
    assert all(f.ok for f in flows), [f.line() for f in flows]
    for f in flows:
        assert f.deposits == world.money_in[f.asset]
        assert f.withdrawals + f.captured_out == -world.money_out[f.asset]


def _history() -> World:
    """alice deposits 100, pays bob 30, holds 20 and captures 5 of it out of the system,
    holds 10 more and captures 4 of it to carol."""
    world = World()
    for command in (
        Deposit(command_id="d", account="alice", asset="USD", amount=100),
        Transfer(command_id="t", account="alice", to="bob", asset="USD", amount=30),
        Hold(command_id="h", account="alice", hold_id="h1", asset="USD", amount=20),
        Capture(command_id="c", account="alice", hold_id="h1", amount=5),
        Hold(command_id="h2", account="alice", hold_id="h2", asset="USD", amount=10),
        Capture(command_id="c2", account="alice", hold_id="h2", amount=4, to="carol"),
    ):
        assert world.submit(command).status is Status.APPLIED
        world.deliver()
    return world


def test_the_history_is_conserved_and_its_flows_are_named() -> None:
    (usd,) = _history().flows()
    assert usd == AssetFlow("USD", 95, deposits=100, captured_out=-5, internal=0)
    assert usd.ok and usd.line() == (
        "USD: balances 95 = deposits 100 - withdrawals 0 - captured out 5; between accounts net 0"
    )


def _entry(account: str, delta: int) -> Entry:
    return Entry(account=account, asset="USD", seq=99, available=0, held=0,
                 delta_available=delta, delta_held=0)  # fmt: skip


def test_money_planted_lost_or_taken_for_paid_out_is_caught() -> None:
    world = _history()
    balances = world.balances()
    flows = flows_of(world.results)

    # Money created: a credit applied with no debit anywhere (balance and entry agree).
    planted = Result(command_id="x/credit", account="bob", kind="credit", status=Status.APPLIED,
                     entries=[_entry("bob", 7)], at_ms=1)  # fmt: skip
    (usd,) = conservation(balances + Counter(USD=7), flows_of([*world.results, planted]))
    assert not usd.ok and usd.internal == 7

    # Money lost: a balance short of what the ledger says, or a withdrawal's entry gone.
    (usd,) = conservation(balances - Counter(USD=1), flows)
    assert not usd.ok and "balances 94 != deposits 100" in usd.line()
    withdrawal = Result(command_id="w", account="bob", kind="withdraw", status=Status.APPLIED,
                        entries=[_entry("bob", -3)], at_ms=1)  # fmt: skip
    (usd,) = conservation(balances - Counter(USD=3), flows_of(world.results))
    assert not usd.ok
    (usd,) = conservation(balances - Counter(USD=3), flows_of([*world.results, withdrawal]))
    assert usd.ok

    # A credit applied to the tables whose result is lost: the tables still add up to
    # what came in and went out, but by the entries 30 left alice for no account.
    lost = [r for r in world.results if r.command_id != "alice/t/credit"]
    assert len(lost) == len(world.results) - 1
    (usd,) = conservation(balances, flows_of(lost))
    assert usd.balances == usd.external and usd.internal == -30 and not usd.ok

    # A capture to an account taken for one paid out (its credit is not counted as
    # having left): the credit's money shows as created inside.
    capture = next(r for r in world.results if r.command_id == "c2")
    as_paid_out = [msgspec.structs.replace(r, emitted=0) if r is capture else r
                   for r in world.results]  # fmt: skip
    (usd,) = conservation(balances, flows_of(as_paid_out))
    assert not usd.ok and usd.captured_out == -9 and usd.internal == 4

    # A result that is not applied moves nothing, whatever entries it claims.
    rejected = Result(command_id="r", account="bob", kind="deposit", status=Status.REJECTED,
                      entries=[_entry("bob", 50)], at_ms=1)  # fmt: skip
    assert flows_of([rejected]) == Counter()


def test_flow_of_names_the_boundary() -> None:
    assert flow_of("deposit", pays_out=False) is Flow.DEPOSIT
    assert flow_of("withdraw", pays_out=True) is Flow.WITHDRAW
    assert flow_of("capture", pays_out=True) is Flow.CAPTURE_OUT
    assert flow_of("capture", pays_out=False) is Flow.INTERNAL
    for kind in ("transfer", "disburse", "hold", "release", "credit", "refund", "expire"):
        assert flow_of(kind, pays_out=True) is Flow.INTERNAL
        assert flow_of(kind, pays_out=False) is Flow.INTERNAL
