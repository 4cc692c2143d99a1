"""Subscriptions, their progress and their parked deliveries in PostgreSQL (migrations
0005 and 0006): the SQL the subscriptions API and the notifier share."""

from __future__ import annotations

from typing import Any

import msgspec

from notify.rules import Filter

SUBSCRIPTIONS_MAX = 100  # each subscription has a reader of the whole events topic
DELIVERIES_PAGE_MAX = 500


class Subscription(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    url: str
    secret: str
    filter: Filter
    paused: bool
    created_at_ms: int

    def public(self) -> dict[str, Any]:
        """What the API shows: never the secret."""
        out = msgspec.structs.asdict(self)
        del out["secret"]
        out["filter"] = msgspec.structs.asdict(self.filter)
        return out


_COLUMNS = "id, url, secret, accounts, account_prefixes, statuses, kinds, paused, created_at_ms"


def _row(row: Any) -> Subscription:
    return Subscription(
        id=row["id"],
        url=row["url"],
        secret=row["secret"],
        filter=Filter(
            accounts=list(row["accounts"]),
            account_prefixes=list(row["account_prefixes"]),
            statuses=list(row["statuses"]),
            kinds=list(row["kinds"]),
        ),
        paused=row["paused"],
        created_at_ms=row["created_at_ms"],
    )


async def create(pool: Any, sub: Subscription) -> bool:
    """Insert; False when SUBSCRIPTIONS_MAX subscriptions exist already."""
    f = sub.filter
    row = await pool.fetchrow(
        f"INSERT INTO subscriptions ({_COLUMNS})"
        " SELECT $1, $2, $3, $4, $5, $6, $7, false, $8"
        " WHERE (SELECT count(*) FROM subscriptions) < $9 RETURNING id",
        sub.id, sub.url, sub.secret, f.accounts, f.account_prefixes, f.statuses, f.kinds,
        sub.created_at_ms, SUBSCRIPTIONS_MAX,
    )  # fmt: skip
    return row is not None


async def all_subscriptions(pool: Any) -> list[Subscription]:
    rows = await pool.fetch(f"SELECT {_COLUMNS} FROM subscriptions ORDER BY created_at_ms, id")
    return [_row(r) for r in rows]


async def one(pool: Any, subscription_id: str) -> Subscription | None:
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM subscriptions WHERE id = $1", subscription_id
    )
    return None if row is None else _row(row)


async def set_paused(pool: Any, subscription_id: str, paused: bool) -> Subscription | None:
    row = await pool.fetchrow(
        f"UPDATE subscriptions SET paused = $2 WHERE id = $1 RETURNING {_COLUMNS}",
        subscription_id,
        paused,
    )
    return None if row is None else _row(row)


async def delete(pool: Any, subscription_id: str) -> bool:
    done = await pool.execute("DELETE FROM subscriptions WHERE id = $1", subscription_id)
    return bool(done == "DELETE 1")


async def deliveries(
    pool: Any, subscription_id: str, status: str, limit: int
) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        'SELECT delivery_id, status, topic, partition, "offset", command_id, account,'
        " attempts, last_error, at_ms FROM subscription_deliveries"
        " WHERE subscription_id = $1 AND status = $2 ORDER BY at_ms, delivery_id LIMIT $3",
        subscription_id,
        status,
        limit,
    )
    return [dict(r.items()) for r in rows]


async def progress(pool: Any, subscription_id: str, topic: str) -> dict[int, int]:
    rows = await pool.fetch(
        "SELECT partition, next_offset FROM subscription_progress"
        " WHERE subscription_id = $1 AND topic = $2",
        subscription_id,
        topic,
    )
    return {r["partition"]: r["next_offset"] for r in rows}


async def save_progress(
    pool: Any, subscription_id: str, topic: str, offsets: dict[int, int]
) -> None:
    """Move the stored progress forward (never back: a stale writer cannot undo)."""
    await pool.executemany(
        "INSERT INTO subscription_progress (subscription_id, topic, partition, next_offset)"
        " SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM subscriptions WHERE id = $1)"
        " ON CONFLICT (subscription_id, topic, partition) DO UPDATE"
        " SET next_offset = GREATEST(subscription_progress.next_offset, EXCLUDED.next_offset)",
        [(subscription_id, topic, p, o) for p, o in offsets.items()],
    )


async def lanes_done(
    pool: Any, subscription_id: str, topic: str, lanes: int
) -> dict[tuple[int, int], int]:
    """(partition, lane) -> the offset of the last event that lane has done, for this
    lane count."""
    rows = await pool.fetch(
        "SELECT partition, lane, done_offset FROM subscription_lanes"
        " WHERE subscription_id = $1 AND topic = $2 AND lanes = $3",
        subscription_id,
        topic,
        lanes,
    )
    return {(r["partition"], r["lane"]): r["done_offset"] for r in rows}


async def save_lanes_done(
    pool: Any, topic: str, lanes: int, done: dict[tuple[str, int, int], int]
) -> None:
    """Move lanes' done offsets forward, (subscription id, partition, lane) -> offset,
    any number of lanes of any subscriptions in one statement (never back: a stale writer
    cannot undo; a deleted subscription's rows are left out)."""
    keys = sorted(done)
    # The subscriptions are locked as the foreign key's check locks them: a delete running
    # meanwhile either waits or leaves its rows out, never fails the statement.
    await pool.execute(
        "INSERT INTO subscription_lanes"
        " (subscription_id, topic, partition, lanes, lane, done_offset)"
        " SELECT d.subscription_id, $1, d.partition, $2, d.lane, d.done_offset"
        " FROM unnest($3::text[], $4::integer[], $5::integer[], $6::bigint[])"
        " AS d (subscription_id, partition, lane, done_offset)"
        " JOIN (SELECT id FROM subscriptions WHERE id = ANY($3) FOR KEY SHARE) s"
        " ON s.id = d.subscription_id"
        " ON CONFLICT (subscription_id, topic, partition, lanes, lane) DO UPDATE"
        " SET done_offset = GREATEST(subscription_lanes.done_offset, EXCLUDED.done_offset)",
        topic, lanes,
        [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
        [done[k] for k in keys],
    )  # fmt: skip


async def park(pool: Any, subscription_id: str, row: dict[str, Any]) -> None:
    """Store a delivery given up on (once per delivery id)."""
    await pool.execute(
        "INSERT INTO subscription_deliveries (delivery_id, subscription_id, status, topic,"
        ' partition, "offset", command_id, account, attempts, last_error, at_ms)'
        " SELECT $1, $2, 'failed', $3, $4, $5, $6, $7, $8, $9, $10"
        " WHERE EXISTS (SELECT 1 FROM subscriptions WHERE id = $2)"
        " ON CONFLICT (delivery_id) DO NOTHING",
        row["delivery_id"], subscription_id, row["topic"], row["partition"], row["offset"],
        row["command_id"], row["account"], row["attempts"], row["last_error"][:500],
        row["at_ms"],
    )  # fmt: skip


class Redelivery(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    subscription_id: str
    from_ms: int
    to_ms: int


REDELIVERIES_PENDING_MAX = 10  # per subscription


async def request_redelivery(pool: Any, r: Redelivery) -> bool:
    """Store a request; False when the subscription has too many pending."""
    row = await pool.fetchrow(
        "INSERT INTO subscription_redeliveries (id, subscription_id, from_ms, to_ms)"
        " SELECT $1, $2, $3, $4 WHERE (SELECT count(*) FROM subscription_redeliveries"
        " WHERE subscription_id = $2 AND NOT done) < $5 RETURNING id",
        r.id, r.subscription_id, r.from_ms, r.to_ms, REDELIVERIES_PENDING_MAX,
    )  # fmt: skip
    return row is not None


async def pending_redeliveries(pool: Any) -> list[Redelivery]:
    rows = await pool.fetch(
        "SELECT id, subscription_id, from_ms, to_ms FROM subscription_redeliveries"
        " WHERE NOT done ORDER BY id"
    )
    return [Redelivery(**dict(r.items())) for r in rows]


async def finish_redelivery(pool: Any, redelivery_id: str) -> None:
    await pool.execute(
        "UPDATE subscription_redeliveries SET done = true WHERE id = $1", redelivery_id
    )
