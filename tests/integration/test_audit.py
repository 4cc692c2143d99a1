"""`tally audit` against a real deployment: a drained one agrees everywhere; a tampered
PostgreSQL balance and a tampered Redis hash are found, exactly those, by account, asset
and seq; damage to the ledger itself and a stray Redis key are named too."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import redis.asyncio as aioredis

from audit.run import Audit, Report, render
from core.settings import Settings
from harness.collector import all_answered, expected_counts
from harness.procs import EngineProcess, command, free_port, produce, run_cli
from sinks import verify
from sinks.pg import quote
from sinks.redis_store import balance_key
from tests.integration.sink_support import Deployment, deployment, running
from topics.schema import Deposit, Withdraw


async def _two_balances(conn: Any, schema: str) -> list[Any]:
    """Two balances with a breakpoint behind them and entries after it."""
    return list(
        await conn.fetch(
            f"SELECT b.shard_id, b.account, b.asset, b.seq FROM {schema}.balances b"
            f" WHERE b.seq > 6 AND b.seq % 5 <> 0 ORDER BY b.account, b.asset LIMIT 2"
        )
    )


async def _through_a_second_worker(d: Deployment, tmp_path: Path, clean: Report) -> None:
    """With two workers, each forwards the shard pages it does not own: an audit through
    either sees the same. Then the second leaves again (the first recovers its shards;
    the audits after this wait for that)."""
    b = EngineProcess(d.settings, prefix=d.settings.topic_prefix, data_dir=tmp_path / "b",
                      partitions=d.settings.partitions)  # fmt: skip
    await b.start()
    try:
        for _ in range(300):
            served = [set((await w.readyz())["serving"]) for w in (d.engine, b)]
            if all(served) and len(served[0] | served[1]) == d.settings.partitions:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"shards not split: {served}\n{b.tail()}")
        via_b = await Audit(
            d.settings, engine_url=f"http://127.0.0.1:{b.port}", say=lambda _: None
        ).run()
        assert via_b.ok and via_b.compared == clean.compared, render(via_b)
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{b.port}/shards"
            for url, status in ((f"{base}/{d.settings.partitions}/balances", 404),
                                (f"{base}/0/balances?limit=0", 400),
                                (f"{base}/0/balances?after=no-asset", 400)):  # fmt: skip
                async with http.get(url) as response:
                    assert response.status == status, url
    finally:
        assert await b.stop() == 0


async def test_audit_agrees_then_names_what_was_tampered_with(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    async with deployment(settings, unique, tmp_path) as d:
        await d.project()
        s, schema = d.settings, quote(d.schema)
        engine_url = f"http://127.0.0.1:{d.engine.port}"
        progress: list[str] = []

        async def run(**options: Any) -> Report:
            options.setdefault("engine_url", engine_url)
            return await Audit(s, say=progress.append, progress_tty=False, **options).run()

        # Small pages: each shard's streams are merged over many pages.
        clean = await run(batch_size=7)
        assert clean.ok, render(clean)
        assert clean.balances > 100
        assert (
            clean.compared["ledger"]
            == clean.compared["postgres"]
            == clean.compared["redis"]
            == clean.compared["engine"]
            == clean.balances
        )
        assert progress[-1].startswith(f"audit: done, {clean.balances:,} balances in ")
        assert any(f.captured_out < 0 for f in clean.flows), "the workload captures out"
        assert any(f.deposits > 0 for f in clean.flows)
        await _through_a_second_worker(d, tmp_path, clean)

        conn = await asyncpg.connect(s.pg_dsn)
        rd: Any = aioredis.from_url(s.redis_url)
        try:
            first, second = await _two_balances(conn, schema)
            await conn.execute(
                f"UPDATE {schema}.balances SET available = available + 1"
                " WHERE shard_id = $1 AND account = $2 AND asset = $3",
                first["shard_id"], first["account"], first["asset"],
            )  # fmt: skip
            key = balance_key(
                s.topic_prefix, second["shard_id"], second["account"], second["asset"]
            )
            await rd.hincrby(key, "held", 7)

            code, out, err = await run_cli(s, "audit", "--engine-url", engine_url)
            assert code == 1, out + err
            assert "mismatches: 2 (postgres 1, redis 1)" in out, out
            for row, store in ((first, "postgres"), (second, "redis")):
                where = (
                    f"{row['account']}/{row['asset']} seq {row['seq']} (shard {row['shard_id']})"
                )
                assert f"{store:<10} {where}: expected (ledger) available " in out, out

            found = await run()
            assert dict(found.mismatches) == {"postgres": 1, "redis": 1}, render(found)
            named = {(m.kind, m.account, m.asset, m.seq) for m in found.first}
            assert named == {
                ("postgres", first["account"], first["asset"], first["seq"]),
                ("redis", second["account"], second["asset"], second["seq"]),
            }
            # Without Redis and the engine, only PostgreSQL's tampering is left to find.
            alone = await run(engine_url=None, with_redis=False)
            assert dict(alone.mismatches) == {"postgres": 1}, render(alone)
            assert alone.skipped == ["redis", "engine"]

            # The ledger itself: an entry below the last breakpoint goes missing (the
            # balance still follows from the breakpoint, but the seqs have a gap and
            # the entries no longer sum up to it), and Redis gains a key no one else has.
            gone = await conn.fetchrow(
                f"DELETE FROM {schema}.ledger_entries WHERE (shard_id, account, asset, seq) ="
                f" (SELECT e.shard_id, e.account, e.asset, e.seq FROM {schema}.ledger_entries e"
                f" JOIN {schema}.breakpoints p ON p.shard_id = e.shard_id"
                " AND p.account = e.account AND p.asset = e.asset AND p.to_seq = 5"
                " WHERE e.seq = 1 AND e.kind <> 'hold' AND NOT (e.account = ANY($1::text[]))"
                " ORDER BY e.account, e.asset LIMIT 1)"
                " RETURNING shard_id, account, asset",
                [first["account"], second["account"]],
            )
            assert gone is not None
            await rd.hset(balance_key(s.topic_prefix, 0, "ghost", "USD"),
                          mapping={"available": 5, "held": 0, "seq": 1})  # fmt: skip
            damaged = await run()
        finally:
            await conn.close()
            await rd.aclose()
        assert dict(damaged.mismatches) == {
            "postgres": 1,
            "redis": 2,
            "seq_gap": 1,
            "breakpoint": 1,
            "conservation": 1,
        }, render(damaged)
        kinds = {(m.kind, m.account) for m in damaged.first}
        assert {("seq_gap", gone["account"]), ("breakpoint", gone["account"])} <= kinds
        assert ("redis", "ghost") in kinds

        # A store that does not answer: exit 2, naming it.
        code, out, err = await run_cli(
            s, "audit", "--engine-url", f"http://127.0.0.1:{free_port()}"
        )
        assert code == 2 and "tally audit: engine: no worker answers" in err, out + err
        no_redis = msgspec.structs.replace(s, redis_url=f"redis://127.0.0.1:{free_port()}/0")
        code, out, err = await run_cli(no_redis, "audit", "--skip-engine")
        assert code == 2 and "tally audit: Redis: unreachable at redis://" in err, out + err


async def test_audit_is_clean_when_the_lifetime_flows_pass_2_63(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    """Finding 2 of the money-at-the-bounds issue: deposit 2^63-1, withdraw it, deposit 1.
    The only balance is 1, but the deposits add up to 2^63: the audit sums them exactly
    (it used to cast the sum to bigint, fail with "bigint out of range" and exit 2)."""
    async with deployment(settings, unique, tmp_path, count=10, accounts=2) as d:
        account = f"f2-{unique}"
        cmds = [
            Deposit(command_id="d1", account=account, asset="USD", amount=2**63 - 1),
            Withdraw(command_id="w1", account=account, asset="USD", amount=2**63 - 1),
            Deposit(command_id="d2", account=account, asset="USD", amount=1),
        ]
        pg, rd = d.runner("postgres"), d.runner("redis")
        async with running(pg, rd):
            await produce(d.settings.kafka_bootstrap, d.engine.topics.commands.name,
                          [command(c) for c in cmds])  # fmt: skip
            done = all_answered(expected_counts(c.command_id for c in cmds))
            assert await d.collector.wait_for(done, timeout_s=60, say=lambda _: None)
            assert await verify.wait_drained([pg, rd], timeout_s=60)
        assert (await d.pg())[(account, "USD")] == (1, 0, 3)
        engine_url = f"http://127.0.0.1:{d.engine.port}"
        code, out, err = await run_cli(d.settings, "audit", "--engine-url", engine_url)
        assert code == 0, out + err
        assert "bigint" not in out + err
