"""Money at the bounds on the real services: 128-bit amounts exact through the ingress, the
engine, its result events and table view, PostgreSQL and Redis; a refund that meets a full
balance still applies; `tally audit` is clean on flows past 2^64; and a deployment written
in the 64-bit format (bigint columns) is migrated in place."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import redis.asyncio as aioredis

from audit.run import Audit, render
from core.settings import Settings
from harness.collector import Collector, all_answered, expected_counts
from harness.procs import EngineProcess, IngressProcess, command, produce, run_cli
from ingress.client import Client
from sinks import numeric, verify
from sinks.migrate import MIGRATIONS, SHARDED_TABLES, migrate
from sinks.pg import quote
from sinks.postgres import PostgresStore
from sinks.redis_store import RedisStore, balance_key
from sinks.runner import Batch
from streams.state import BalanceState
from streams.store import account_key
from streams.store import balance_key as balance_key_of
from tests.integration.sink_support import PARTITIONS, Deployment, deployment, running
from topics import limits
from topics.admin import ensure_topics
from topics.names import changelog_name, engine_group, engine_topic_specs
from topics.schema import (
    Configure,
    Deposit,
    Entry,
    Hold,
    Reason,
    Release,
    Result,
    Status,
    Transfer,
    Withdraw,
)
from topics.shard import shard_of
from topics.specs import topics_for

BIG = 2**100 + 7
INT64_MAX = 2**63 - 1


def _commands(unique: str) -> tuple[dict[str, str], list[Any]]:
    """The accounts and the commands produced straight to Kafka (the big deposit itself
    goes through the ingress)."""
    a = {n: f"{n}-{unique}" for n in ("whale", "fish", "ovr", "shut", "f2", "flow", "past")}
    cmds: list[Any] = [
        # The whale pays a fish more than 2^64: a credit across shards, exact.
        Transfer(command_id="t-whale", account=a["whale"], to=a["fish"], asset="ETH",
                 amount=2**64 + 3),
        # Finding 1: the refund of a credit to a closed account meets a balance that a
        # deposit of 2^63-1 filled meanwhile; it applies and the 100 are kept.
        Deposit(command_id="d-ovr", account=a["ovr"], asset="USD", amount=100),
        Transfer(command_id="t-ovr", account=a["ovr"], to=a["shut"], asset="USD", amount=100),
        Deposit(command_id="d-ovr-full", account=a["ovr"], asset="USD", amount=INT64_MAX),
        # Finding 2: deposit 2^63-1, withdraw it, deposit 1: the flows pass 2^63.
        Deposit(command_id="d-f2", account=a["f2"], asset="USD", amount=INT64_MAX),
        Withdraw(command_id="w-f2", account=a["f2"], asset="USD", amount=INT64_MAX),
        Deposit(command_id="d-f2-1", account=a["f2"], asset="USD", amount=1),
    ]  # fmt: skip
    # Lifetime flows far past 2^64 (3 x 2^127) on a balance that ends at 3.
    for i in range(3):
        cmds.append(Deposit(command_id=f"d-flow-{i}", account=a["flow"], asset="ETH",
                            amount=limits.AMOUNT_MAX))  # fmt: skip
        cmds.append(Withdraw(command_id=f"w-flow-{i}", account=a["flow"], asset="ETH",
                             amount=limits.AMOUNT_MAX))  # fmt: skip
    cmds.append(Deposit(command_id="d-flow-3", account=a["flow"], asset="ETH", amount=3))
    # A release never fails: a balance filled to the cap while its hold was open ends
    # at 2 x (2^127-1), past the cap, in every store.
    top = limits.BALANCE_MAX
    cmds += [
        Deposit(command_id="d-past-1", account=a["past"], asset="ETH", amount=top),
        Hold(command_id="h-past", account=a["past"], hold_id="h", asset="ETH", amount=top),
        Deposit(command_id="d-past-2", account=a["past"], asset="ETH", amount=top),
        Release(command_id="r-past", account=a["past"], hold_id="h"),
    ]
    return a, cmds


async def _answered(d: Deployment, ids: list[str]) -> None:
    done = all_answered(expected_counts(ids))
    assert await d.collector.wait_for(
        lambda r: done(r) and not r.pending_internal(), timeout_s=90, say=lambda _: None
    ), d.engine.tail()


def _result(d: Deployment, command_id: str) -> Result:
    (result,) = d.collector.results.by_id[command_id]
    return result


async def test_128_bit_amounts_are_exact_in_every_store_and_the_audit_is_clean(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    async with deployment(settings, unique, tmp_path, count=10, accounts=2) as d:
        s = d.settings
        a, cmds = _commands(unique)
        ingress = IngressProcess(settings, prefix=s.topic_prefix, log_path=tmp_path / "ing.log",
                                 partitions=PARTITIONS, ingress_insecure=True)  # fmt: skip
        pg, rd = d.runner("postgres"), d.runner("redis")
        await ingress.start()
        try:
            async with running(pg, rd), Client(ingress.url) as http:
                big = Deposit(command_id="d-whale", account=a["whale"], asset="ETH", amount=BIG)
                answer = await http.submit(big, wait=20)
                assert answer.status == 200, answer
                assert answer.body["status"] == "applied"
                assert answer.body["entries"][0]["available"] == BIG
                # The payee is closed before anything is sent to it.
                shut = Configure(command_id="c-shut", account=a["shut"], status="closed")
                await produce(s.kafka_bootstrap, d.engine.topics.commands.name, [command(shut)])
                await _answered(d, ["c-shut"])
                await produce(s.kafka_bootstrap, d.engine.topics.commands.name,
                              [command(c) for c in cmds])  # fmt: skip
                await _answered(d, ["d-whale", "c-shut", *(c.command_id for c in cmds)])
                # Hostile records straight to the topic: one past the bound is answered
                # invalid_command; an integer of 5,000 digits (beyond what a JSON reader
                # should turn into an int) is dead-lettered. Neither stops the worker.
                hostile = b'{"kind":"deposit","command_id":"%s","account":"%s","asset":"ETH",' \
                          b'"amount":%s}'  # fmt: skip
                over = hostile % (b"x-over", a["whale"].encode(), b"%d" % (limits.AMOUNT_MAX + 1))
                huge = hostile % (b"x-huge", a["whale"].encode(), b"9" * 5000)
                await produce(s.kafka_bootstrap, d.engine.topics.commands.name,
                              [(a["whale"], over, None), (a["whale"], huge, None)])  # fmt: skip
                assert await d.collector.wait_for(
                    lambda r: "x-over" in r.by_id and r.dead_letters, timeout_s=60,
                    say=lambda _: None,
                ), d.engine.tail()  # fmt: skip
                assert await verify.wait_drained([pg, rd], timeout_s=60)
                cached = await http.balances(a["whale"])
                strong = await http.balances(a["whale"], strong=True)
                url = f"{ingress.url}/v1/accounts/{a['whale']}/balances"
                async with aiohttp.ClientSession() as session, session.get(url) as response:
                    raw = await response.read()
        finally:
            await ingress.stop()

        whale = BIG - 2**64 - 3
        # The result event of the deposit, as the engine wrote it.
        (entry,) = _result(d, "d-whale").entries
        assert (entry.available, entry.delta_available, entry.seq) == (BIG, BIG, 1)
        # The ingress: Redis-backed and strong reads, a JSON number of 31 digits.
        for read in (cached, strong):
            assert read.status == 200, read
            assert read.body["balances"]["ETH"]["available"] == whale, read
        # On the wire a JSON number of 31 digits, never a string or a float.
        assert b'"available":%d,' % whale in raw, raw
        # The engine's table view.
        assert (await d.engine.balances(a["whale"]))["ETH"].available == whale
        assert (await d.engine.balances(a["fish"]))["ETH"].available == 2**64 + 3

        rejected = _result(d, "x-over")
        assert (rejected.status, rejected.reason) == (Status.REJECTED, Reason.INVALID_COMMAND)
        assert "x-huge" not in d.collector.results.by_id
        # The letter is bounded (its first bytes, the record's length and digest), and
        # names exactly the record that was sent.
        letter = d.collector.results.dead_letters[0]
        assert (letter.raw_len, letter.raw_sha256) == (len(huge), hashlib.sha256(huge).hexdigest())
        assert letter.raw.startswith('{"kind":"deposit","command_id":"x-huge"')

        # Finding 1: the refund applied, the 100 are kept.
        refund = _result(d, f"{a['ovr']}/t-ovr/credit/refund")
        assert refund.status is Status.APPLIED, refund
        assert (await d.engine.balances(a["ovr"]))["USD"].available == INT64_MAX + 100

        # PostgreSQL: numeric columns, exact to the digit, in balances and ledger_entries.
        conn = await asyncpg.connect(s.pg_dsn, server_settings={"search_path": quote(d.schema)})
        try:
            row = await conn.fetchrow(
                "SELECT available::text AS t, available FROM balances"
                " WHERE account = $1 AND asset = 'ETH'", a["whale"])  # fmt: skip
            first = await conn.fetchrow(
                "SELECT delta_available::text AS d, available::text AS a FROM ledger_entries"
                " WHERE account = $1 AND asset = 'ETH' AND seq = 1", a["whale"])  # fmt: skip
            kinds = await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = $1 AND table_name IN ('balances', 'ledger_entries')"
                " AND column_name IN ('available', 'held', 'delta_available', 'delta_held')",
                d.schema)  # fmt: skip
        finally:
            await conn.close()
        assert row["t"] == str(whale) and int(row["available"]) == whale
        assert (first["d"], first["a"]) == (str(BIG), str(BIG))
        assert {k["data_type"] for k in kinds} == {"numeric"}

        # Redis: decimal strings, as given.
        client: Any = aioredis.from_url(s.redis_url)
        try:
            key = balance_key(s.topic_prefix, shard_of(a["whale"], PARTITIONS), a["whale"], "ETH")
            stored = await client.hget(key, "available")
        finally:
            await client.aclose()
        assert stored == str(whale).encode()

        # Every store agrees with the events, and the ledger reproduces every balance.
        events = verify.event_balances(d.collector.results)
        assert events[(a["f2"], "USD")][0] == 1
        assert events[(a["flow"], "ETH")][0] == 3
        assert events[(a["past"], "ETH")] == (2 * limits.BALANCE_MAX, 0, 4)
        for name, other in (
            ("postgres", await d.pg()),
            ("ledger", await verify.ledger_balances(s.pg_dsn, d.schema)),
            ("breakpoints", await verify.breakpoint_balances(s.pg_dsn, d.schema)),
            ("redis", await verify.redis_balances(s.redis_url, s.topic_prefix)),
        ):
            compared = verify.compare(name, events, other)
            assert compared.ok, compared.line()

        # Finding 2 and flows past 2^64: the audit is clean, in process and by the CLI.
        engine_url = f"http://127.0.0.1:{d.engine.port}"
        report = await Audit(s, engine_url=engine_url, say=lambda _: None).run()
        assert report.ok, render(report)
        eth = next(f for f in report.flows if f.asset == "ETH")
        assert eth.deposits > 2**64 * 3
        code, out, err = await run_cli(s, "audit", "--engine-url", engine_url)
        assert code == 0, out + err


# Migration from the 64-bit format -----------------------------------------------------------


async def _a_deployment_of_today(conn: Any, schema: str) -> None:
    """What `tally migrate` left before 0002: the bigint tables, their partitions, and
    rows at the old bound."""
    ident = quote(schema)
    await conn.execute(f"CREATE SCHEMA {ident}")
    await conn.execute(
        f"CREATE TABLE {ident}.schema_migrations (version integer PRIMARY KEY,"
        " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    async with conn.transaction():
        await conn.execute(f"SET LOCAL search_path TO {ident}")
        await conn.execute((MIGRATIONS / "0001_projections.sql").read_text())
        await conn.execute("INSERT INTO schema_migrations VALUES (1, 'projections')")
    for table in SHARDED_TABLES:
        for shard in range(PARTITIONS):
            await conn.execute(
                f"CREATE TABLE {ident}.{quote(f'{table}_p{shard}')}"
                f" PARTITION OF {ident}.{table} FOR VALUES IN ({shard})"
            )
    now = datetime.now(UTC)
    await conn.execute(
        f"INSERT INTO {ident}.balances VALUES (1, 'old', 'USD', $1, 0, 1, $2)", INT64_MAX, now
    )
    await conn.execute(
        f"INSERT INTO {ident}.ledger_entries VALUES"
        " (1, 'old', 'USD', 1, 'd-old', 'deposit', $1, 0, $1, 0, $2)",
        INT64_MAX,
        now,
    )


async def test_a_bigint_deployment_is_migrated_and_then_takes_128_bit_amounts(
    settings: Settings, unique: str
) -> None:
    schema = f"mig-big-{unique}"
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        await _a_deployment_of_today(conn, schema)
        with_bigint = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = $1"
            " AND table_name = 'balances' AND data_type = 'bigint'", schema)  # fmt: skip
        assert with_bigint == 2 + 1  # available, held (and seq)
        # Every migration after the first, 0002_numeric_money.sql among them, applies to
        # a deployment of today's shape with data in it.
        later = sorted(path.name for path in MIGRATIONS.glob("*.sql"))[1:]
        assert "0002_numeric_money.sql" in later
        assert await migrate(settings.pg_dsn, schema, PARTITIONS) == later
        assert await migrate(settings.pg_dsn, schema, PARTITIONS) == []
        types = await conn.fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = $1 AND (column_name LIKE 'available%'"
            " OR column_name LIKE 'held%' OR column_name LIKE 'delta%')", schema)  # fmt: skip
        # Parents and every partition, all numeric.
        assert len(types) == (2 + 4 + 6) * (PARTITIONS + 1)
        assert {t["data_type"] for t in types} == {"numeric"}, types
        assert (await verify.pg_balances(settings.pg_dsn, schema))[("old", "USD")] == (
            INT64_MAX, 0, 1)  # fmt: skip

        # The sink writes the next entry of that balance past 2^64, exactly.
        store = PostgresStore(settings.pg_dsn, schema, breakpoint_every=2)
        after = INT64_MAX + BIG
        entry = Entry(account="old", asset="USD", seq=2, available=after, held=0,
                      delta_available=BIG, delta_held=0)  # fmt: skip
        result = Result(command_id="d-new", account="old", kind="deposit",
                        status=Status.APPLIED, entries=[entry], at_ms=1)  # fmt: skip
        try:
            await store.write(Batch(topic=f"t-{unique}", events=[(1, result)], offsets={1: 1}))
        finally:
            await store.close()
        for read in (verify.pg_balances, verify.ledger_balances, verify.breakpoint_balances):
            assert (await read(settings.pg_dsn, schema))[("old", "USD")] == (after, 0, 2), read
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote(schema)} CASCADE")
        await conn.close()


async def test_redis_holds_the_digits_a_double_would_round(settings: Settings, unique: str) -> None:
    """A Redis hash written by the sink's script holds the digits it was given, even
    where a double would have rounded them (2^53 + 1, 2^127 - 1)."""
    prefix = f"big-{unique}"
    store = RedisStore(settings.redis_url, prefix, PARTITIONS)
    values = [2**53 + 1, limits.AMOUNT_MAX, -(2**127 - 1), limits.AMOUNT_MAX * 3]
    events = []
    # `held` and the deltas stay within what an event may carry (held at most the cap,
    # a delta one amount); `available` goes past the cap, as money coming back takes it.
    helds = [min(abs(value), limits.BALANCE_MAX) for value in values]
    for i, value in enumerate(values):
        delta = max(-limits.AMOUNT_MAX, min(value, limits.AMOUNT_MAX))
        entry = Entry(account=f"r{i}", asset="ETH", seq=1, available=value, held=helds[i],
                      delta_available=delta, delta_held=helds[i])  # fmt: skip
        events.append((0, Result(command_id=f"c{i}", account=f"r{i}", kind="deposit",
                                 status=Status.APPLIED, entries=[entry], at_ms=1)))  # fmt: skip
    try:
        await store.write(Batch(topic="t", events=events, offsets={0: len(events)}))
        got = await verify.redis_balances(settings.redis_url, prefix)
        assert got == {(f"r{i}", "ETH"): (v, helds[i], 1) for i, v in enumerate(values)}
    finally:
        await store.close()
        await verify.drop(settings.pg_dsn, f"unused-{prefix}", settings.redis_url, prefix)


async def test_the_sink_codec_writes_what_postgresql_reads_as_the_same_digits(
    settings: Settings,
) -> None:
    """sinks.numeric against the real server: by COPY and as numeric[] parameters, every
    bound is stored as exactly its digits, and sums of them are exact."""
    values = [0, 1, -1, 9_999, 10_000, 2**53 + 1, INT64_MAX, 2**63, 2**64, limits.AMOUNT_MAX,
              -limits.AMOUNT_MAX, 5 * 2**127, 10**60]  # fmt: skip
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        await numeric.use_int_codec(conn)
        await conn.execute("CREATE TEMP TABLE money (i int, v numeric)")
        await conn.copy_records_to_table("money", records=list(enumerate(values)))
        await conn.execute(
            "INSERT INTO money SELECT * FROM unnest($1::int[], $2::numeric[])",
            [100 + i for i in range(len(values))], values,
        )  # fmt: skip
        rows = await conn.fetch("SELECT i, v, v::text AS t FROM money ORDER BY i")
        total = await conn.fetchval("SELECT sum(v) FROM money")
    finally:
        await conn.close()
    assert [r["v"] for r in rows] == values * 2
    assert [r["t"] for r in rows] == [str(v) for v in values] * 2
    assert total == 2 * sum(values)


async def test_an_engine_recovers_a_changelog_written_in_the_64_bit_format(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    """Changelog records as the 64-bit engine wrote them (literal bytes) are recovered
    into an empty state directory, and the balance then grows past 2^64; a second worker
    recovering the changelog with old and new records mixed reads the same."""
    prefix = f"old-{unique}"
    local = msgspec.structs.replace(settings, topic_prefix=prefix, partitions=PARTITIONS)
    app_id = engine_group(local)
    account = f"old-{unique}"
    shard = shard_of(account, PARTITIONS)
    await ensure_topics(settings.kafka_bootstrap, engine_topic_specs(local, app_id))
    await produce(settings.kafka_bootstrap, changelog_name(app_id), [
        (account_key(account).decode(), b'["active",["USD"]]', shard),
        (balance_key_of(account, "USD").decode(), b"[9223372036854775807,0,4,0]", shard),
    ])  # fmt: skip
    collector = Collector(settings.kafka_bootstrap, topics_for(prefix, PARTITIONS))
    await collector.start(from_end=False)
    first = EngineProcess(settings, prefix=prefix, data_dir=tmp_path / "a", partitions=PARTITIONS)
    await first.start()
    try:
        assert (await first.balances(account))["USD"] == BalanceState(INT64_MAX, 0, 4)
        deposit = Deposit(command_id="d-past-64", account=account, asset="USD", amount=2**64)
        await produce(settings.kafka_bootstrap, first.topics.commands.name, [command(deposit)])
        assert await collector.wait_for(
            lambda r: "d-past-64" in r.by_id, timeout_s=60, say=lambda _: None
        ), first.tail()
        (entry,) = collector.results.by_id["d-past-64"][0].entries
        assert (entry.available, entry.seq) == (INT64_MAX + 2**64, 5)
    finally:
        await collector.stop()
        await first.stop()
    second = EngineProcess(settings, prefix=prefix, data_dir=tmp_path / "b", partitions=PARTITIONS)
    await second.start()
    try:
        assert (await second.balances(account))["USD"] == BalanceState(INT64_MAX + 2**64, 0, 5)
    finally:
        await second.stop()
