"""A realistic, seeded command workload: what the demo, the benchmark and the tests send.

Every account first gets a deposit; then a mix of transfers (most cross shards),
withdrawals, disbursements, holds with and without expiry followed by captures and
releases, account settings (overdrafts, freezes, closures of empty accounts that later
receive credits and refund them), exact retries, reused ids with a different payload,
schema-invalid records and undecodable garbage. The same seed gives the same records.
"""

from __future__ import annotations

import random
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
    rng = random.Random(seed)
    names = [f"acct-{seed}-{i}" for i in range(accounts)]
    work = Workload()
    seq = 0
    sent: list[PublicCommand] = []
    open_holds: list[tuple[str, str]] = []

    def cid() -> str:
        nonlocal seq
        seq += 1
        return f"w{seed}-{seq}"

    def add(command: PublicCommand) -> None:
        sent.append(command)
        work.records.append(
            Record(command.account, encode(command), command.command_id, kind_of(command))
        )

    # Opening deposits so that most later debits can succeed.
    for name in names:
        add(
            Deposit(command_id=cid(), account=name, asset="USD", amount=rng.randrange(10**5, 10**7))
        )
        if len(work.records) >= count:
            return work
    # A few accounts are closed while empty: credits to them come back as refunds.
    for name in rng.sample(names, max(1, accounts // 100)):
        add(Configure(command_id=cid(), account=f"{name}-closed", status="closed"))
        names.append(f"{name}-closed")
    while len(work.records) < count:
        roll = rng.random()
        payer = rng.choice(names)
        asset = "USD" if rng.random() < 0.8 else rng.choice(ASSETS)
        if roll < 0.30:
            add(
                Transfer(
                    command_id=cid(),
                    account=payer,
                    to=_other(rng, names, payer),
                    asset=asset,
                    amount=rng.randrange(1, 20_000),
                )
            )
        elif roll < 0.40:
            add(
                Deposit(
                    command_id=cid(), account=payer, asset=asset, amount=rng.randrange(1, 10**6)
                )
            )
        elif roll < 0.48:
            add(
                Withdraw(
                    command_id=cid(), account=payer, asset=asset, amount=rng.randrange(1, 50_000)
                )
            )
        elif roll < 0.53:
            legs = [
                Leg(to=_other(rng, names, payer), amount=rng.randrange(1, 5_000))
                for _ in range(rng.randrange(2, 12))
            ]
            add(Disburse(command_id=cid(), account=payer, asset=asset, legs=legs))
        elif roll < 0.63:
            hold_id = f"h{seq}"
            expires = None
            if expiring_holds and rng.random() < 0.4:
                expires = now_ms + rng.randrange(2_000, 5_000)
                work.hold_expiry_max_ms = max(work.hold_expiry_max_ms, expires)
            add(
                Hold(
                    command_id=cid(),
                    account=payer,
                    hold_id=hold_id,
                    asset=asset,
                    amount=rng.randrange(1, 30_000),
                    expires_at_ms=expires,
                )
            )
            open_holds.append((payer, hold_id))
        elif roll < 0.73 and open_holds:
            account, hold_id = open_holds.pop(rng.randrange(len(open_holds)))
            if rng.random() < 0.4:
                add(Release(command_id=cid(), account=account, hold_id=hold_id))
            else:
                to = _other(rng, names, account) if rng.random() < 0.5 else None
                amount = rng.randrange(1, 30_000) if rng.random() < 0.5 else None
                add(
                    Capture(
                        command_id=cid(), account=account, hold_id=hold_id, amount=amount, to=to
                    )
                )
        elif roll < 0.76:
            status: AccountStatus = rng.choice(("frozen", "active", "active"))
            if rng.random() < 0.5:
                add(Configure(command_id=cid(), account=payer, status=status))
            else:
                limit = rng.randrange(0, 100_000)
                add(Configure(command_id=cid(), account=payer, asset=asset, overdraft_limit=limit))
        elif roll < 0.82 and sent:
            # An exact retry of an earlier command: answered as a duplicate.
            again = rng.choice(sent)
            work.records.append(Record(again.account, encode(again), again.command_id, "retry"))
        elif roll < 0.84 and sent:
            # The same id with another payload: rejected command_id_reused.
            again = rng.choice(sent)
            forged = Deposit(
                command_id=again.command_id, account=again.account, asset="USD", amount=1
            )
            if encode(forged) != encode(again):
                work.records.append(
                    Record(forged.account, encode(forged), forged.command_id, "reuse")
                )
        elif roll < 0.85 and sent:
            # An earlier id on another account: its own command (ids are scoped by
            # account, whichever shards the two accounts hash to).
            again = rng.choice(sent)
            add(
                Deposit(
                    command_id=again.command_id,
                    account=_other(rng, names, again.account),
                    asset="USD",
                    amount=rng.randrange(1, 5_000),
                )
            )
        elif invalid and roll < 0.86:
            # Schema-invalid but answerable: rejected invalid_command.
            bad_id = cid()
            bad = b'{"kind":"deposit","command_id":"%s","account":"%s","asset":"USD","amount":-5}'
            work.records.append(
                Record(payer, bad % (bad_id.encode(), payer.encode()), bad_id, "invalid")
            )
        elif invalid and roll < 0.87:
            work.records.append(Record(payer, b"\xff not json {", None, "garbage"))
        else:
            add(
                Transfer(
                    command_id=cid(),
                    account=payer,
                    to=_other(rng, names, payer),
                    asset="USD",
                    amount=rng.randrange(1, 5_000),
                )
            )
    return work


def _other(rng: random.Random, names: list[str], not_this: str) -> str:
    while True:
        pick = rng.choice(names)
        if pick != not_this:
            return pick
