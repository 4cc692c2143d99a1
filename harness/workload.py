"""A realistic, seeded command workload: what the demo, the benchmark and the tests send.

Every account first gets a deposit; then a mix of transfers (most cross shards),
withdrawals, disbursements, holds with and without expiry followed by captures and
releases, account settings (overdrafts, freezes, closures of empty accounts that later
receive credits and refund them), exact retries, reused ids with a different payload,
schema-invalid records and undecodable garbage. The same seed gives the same records.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from topics.codec import encode
from topics.schema import (
    AccountStatus,
    Capture,
    Configure,
    Deposit,
    Disburse,
    Hold,
    Leg,
    PublicCommand,
    Release,
    Transfer,
    Withdraw,
    kind_of,
)

ASSETS = ("USD", "EUR", "BTC")


@dataclass
class Record:
    """One record to produce: key (account) and value bytes, and what it is."""

    key: str
    value: bytes
    command_id: str | None  # None for garbage that has no usable id
    kind: str


@dataclass
class Workload:
    records: list[Record] = field(default_factory=list)
    hold_expiry_max_ms: int = 0

    @property
    def command_ids(self) -> set[str]:
        return {r.command_id for r in self.records if r.command_id is not None}

    @property
    def garbage(self) -> int:
        return sum(1 for r in self.records if r.command_id is None)


def build(
    *,
    count: int,
    accounts: int,
    seed: int,
    now_ms: int,
    expiring_holds: bool = True,
    invalid: bool = True,
) -> Workload:
    """`count` records over `accounts` accounts, reproducible from `seed`."""
    b = _Builder(random.Random(seed), seed, [f"acct-{seed}-{i}" for i in range(accounts)])
    rng, names, work = b.rng, b.names, b.work
    # Opening deposits so that most later debits can succeed.
    for name in list(names):
        b.add(
            Deposit(
                command_id=b.cid(), account=name, asset="USD", amount=rng.randrange(10**5, 10**7)
            )
        )
        if len(work.records) >= count:
            return work
    # A few accounts are closed while empty: credits to them come back as refunds.
    for name in rng.sample(names, max(1, accounts // 100)):
        b.add(Configure(command_id=b.cid(), account=f"{name}-closed", status="closed"))
        names.append(f"{name}-closed")
    while len(work.records) < count:
        roll = rng.random()
        payer = rng.choice(names)
        asset = "USD" if rng.random() < 0.8 else rng.choice(ASSETS)
        b.step(roll, payer, asset, now_ms=now_ms, expiring_holds=expiring_holds, invalid=invalid)
    return work


class _Builder:
    """The workload being built: the random source, the accounts, the commands sent so
    far (for retries and reused ids) and the holds still open. Every draw from `rng`
    happens in a fixed order, so one seed gives one workload."""

    def __init__(self, rng: random.Random, seed: int, names: list[str]) -> None:
        self.rng = rng
        self.seed = seed
        self.names = names
        self.work = Workload()
        self.seq = 0
        self.sent: list[PublicCommand] = []
        self.open_holds: list[tuple[str, str]] = []

    def cid(self) -> str:
        self.seq += 1
        return f"w{self.seed}-{self.seq}"

    def add(self, command: PublicCommand) -> None:
        self.sent.append(command)
        self.work.records.append(
            Record(command.account, encode(command), command.command_id, kind_of(command))
        )

    def step(
        self, roll: float, payer: str, asset: str, *, now_ms: int, expiring_holds: bool,
        invalid: bool,
    ) -> None:  # fmt: skip
        """One record of the mix, chosen by `roll`: the first band it falls in whose
        condition holds (no capture without an open hold, no retry before a command)."""
        bands: list[tuple[float, bool, Callable[[], None]]] = [
            (0.30, True, lambda: self._transfer(payer, asset, 20_000)),
            (0.40, True, lambda: self._deposit(payer, asset)),
            (0.48, True, lambda: self._withdraw(payer, asset)),
            (0.53, True, lambda: self._disburse(payer, asset)),
            (0.63, True, lambda: self._hold(payer, asset, now_ms, expiring_holds)),
            (0.73, bool(self.open_holds), self._settle_hold),
            (0.76, True, lambda: self._configure(payer, asset)),
            (0.82, bool(self.sent), self._retry),
            (0.84, bool(self.sent), self._reuse),
            (0.85, bool(self.sent), self._same_id_elsewhere),
            (0.86, invalid, lambda: self._invalid(payer)),
            (0.87, invalid, lambda: self._garbage(payer)),
        ]
        for limit, possible, make in bands:
            if roll < limit and possible:
                make()
                return
        self._transfer(payer, "USD", 5_000)

    def _transfer(self, payer: str, asset: str, most: int) -> None:
        rng = self.rng
        to = _other(rng, self.names, payer)
        self.add(
            Transfer(
                command_id=self.cid(), account=payer, to=to, asset=asset,
                amount=rng.randrange(1, most),
            )
        )  # fmt: skip

    def _deposit(self, payer: str, asset: str) -> None:
        amount = self.rng.randrange(1, 10**6)
        self.add(Deposit(command_id=self.cid(), account=payer, asset=asset, amount=amount))

    def _withdraw(self, payer: str, asset: str) -> None:
        amount = self.rng.randrange(1, 50_000)
        self.add(Withdraw(command_id=self.cid(), account=payer, asset=asset, amount=amount))

    def _disburse(self, payer: str, asset: str) -> None:
        rng = self.rng
        legs = [
            Leg(to=_other(rng, self.names, payer), amount=rng.randrange(1, 5_000))
            for _ in range(rng.randrange(2, 12))
        ]
        self.add(Disburse(command_id=self.cid(), account=payer, asset=asset, legs=legs))

    def _hold(self, payer: str, asset: str, now_ms: int, expiring_holds: bool) -> None:
        rng = self.rng
        hold_id = f"h{self.seq}"
        expires = None
        if expiring_holds and rng.random() < 0.4:
            expires = now_ms + rng.randrange(2_000, 5_000)
            self.work.hold_expiry_max_ms = max(self.work.hold_expiry_max_ms, expires)
        self.add(
            Hold(
                command_id=self.cid(), account=payer, hold_id=hold_id, asset=asset,
                amount=rng.randrange(1, 30_000), expires_at_ms=expires,
            )
        )  # fmt: skip
        self.open_holds.append((payer, hold_id))

    def _settle_hold(self) -> None:
        """A release or a capture (to an account or paid out, in part or whole)."""
        rng = self.rng
        account, hold_id = self.open_holds.pop(rng.randrange(len(self.open_holds)))
        if rng.random() < 0.4:
            self.add(Release(command_id=self.cid(), account=account, hold_id=hold_id))
            return
        to = _other(rng, self.names, account) if rng.random() < 0.5 else None
        amount = rng.randrange(1, 30_000) if rng.random() < 0.5 else None
        self.add(
            Capture(command_id=self.cid(), account=account, hold_id=hold_id, amount=amount, to=to)
        )

    def _configure(self, payer: str, asset: str) -> None:
        rng = self.rng
        status: AccountStatus = rng.choice(("frozen", "active", "active"))
        if rng.random() < 0.5:
            self.add(Configure(command_id=self.cid(), account=payer, status=status))
        else:
            limit = rng.randrange(0, 100_000)
            self.add(
                Configure(command_id=self.cid(), account=payer, asset=asset, overdraft_limit=limit)
            )

    def _retry(self) -> None:
        """An exact retry of an earlier command: answered as a duplicate."""
        again = self.rng.choice(self.sent)
        self.work.records.append(Record(again.account, encode(again), again.command_id, "retry"))

    def _reuse(self) -> None:
        """The same id with another payload: rejected command_id_reused."""
        again = self.rng.choice(self.sent)
        forged = Deposit(command_id=again.command_id, account=again.account, asset="USD", amount=1)
        if encode(forged) != encode(again):
            self.work.records.append(
                Record(forged.account, encode(forged), forged.command_id, "reuse")
            )

    def _same_id_elsewhere(self) -> None:
        """An earlier id on another account: its own command (ids are scoped by account,
        whichever shards the two accounts hash to)."""
        rng = self.rng
        again = rng.choice(self.sent)
        self.add(
            Deposit(
                command_id=again.command_id,
                account=_other(rng, self.names, again.account),
                asset="USD",
                amount=rng.randrange(1, 5_000),
            )
        )

    def _invalid(self, payer: str) -> None:
        """Schema-invalid but answerable: rejected invalid_command."""
        bad_id = self.cid()
        bad = b'{"kind":"deposit","command_id":"%s","account":"%s","asset":"USD","amount":-5}'
        self.work.records.append(
            Record(payer, bad % (bad_id.encode(), payer.encode()), bad_id, "invalid")
        )

    def _garbage(self, payer: str) -> None:
        self.work.records.append(Record(payer, b"\xff not json {", None, "garbage"))


def _other(rng: random.Random, names: list[str], not_this: str) -> str:
    while True:
        pick = rng.choice(names)
        if pick != not_this:
            return pick
