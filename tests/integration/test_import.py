"""`tally import` on the real stack: a CSV imported once and re-imported as duplicates, a
changed amount refused as a reused id, bad rows by line, --strict producing nothing, a
PostgreSQL table read through a cursor, and the fail-fast errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.settings import Settings
from harness.procs import EngineProcess, free_port, run_cli
from importer import run as importer
from importer.rows import Problem, Row, connect_timeout_s, pg_fetch_rows
from importer.run import Options, Report

HEADER = "account,asset,amount\n"
cli_timeout_s = 60
stall_timeout_s = 20.0


def deployment(settings: Settings, engine: EngineProcess) -> Settings:
    """The settings of the engine's own deployment (its topic prefix and shards)."""
    return msgspec.structs.replace(
        settings, topic_prefix=engine.prefix, partitions=engine.partitions
    )


async def run(settings: Settings, source: importer.Source, **options: bool) -> Report:
    """The import in this process (quicker than a child; the CLI is a thin shell)."""
    return await importer.run(
        settings,
        source,
        Options(stall_timeout_s=stall_timeout_s, **options),
        say=lambda _: None,
    )


def csv_file(tmp_path: Path, name: str, rows: list[str]) -> Path:
    path = tmp_path / name
    path.write_text(HEADER + "".join(f"{row}\n" for row in rows))
    return path


async def available(engine: EngineProcess, account: str) -> dict[str, tuple[int, int]]:
    """Each asset's (available, seq), from the worker's table view."""
    return {a: (b.available, b.seq) for a, b in (await engine.balances(account)).items()}


async def records_on(settings: Settings, topic: str, partitions: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
    finally:
        await consumer.stop()
    return sum(ends.values())


async def test_a_csv_is_imported_once_and_a_second_run_is_all_duplicates(
    settings: Settings, engine: EngineProcess, unique: str, tmp_path: Path
) -> None:
    deploy = deployment(settings, engine)
    alice, bob, carol = (f"{n}-{unique}" for n in ("alice", "bob", "carol"))
    sub = f"bob:{unique}:sub"  # ':' in an account id: its own id, its own balance
    rows = [f"{alice},USD,1000", f"{alice},EUR,250", f"{bob},USD,7", f"{carol},BTC,100000000",
            f"{sub},USD,3"]  # fmt: skip
    path = csv_file(tmp_path, "opening.csv", rows)

    code, out, err = await run_cli(deploy, "import", str(path), timeout_s=cli_timeout_s)
    assert code == 0, out + err
    assert "applied: 5" in out and "complete: every row is in the ledger" in out
    assert "import: checked: done, 5 rows" in err  # progress goes to stderr
    expected = {alice: {"USD": (1000, 1), "EUR": (250, 1)}, bob: {"USD": (7, 1)},
                carol: {"BTC": (100000000, 1)}, sub: {"USD": (3, 1)}}  # fmt: skip
    for account, balances in expected.items():
        assert await available(engine, account) == balances

    code, out, err = await run_cli(deploy, "import", str(path), timeout_s=cli_timeout_s)
    assert code == 0, out + err
    assert "already imported: 5" in out and "applied" not in out
    for account, balances in expected.items():
        assert await available(engine, account) == balances  # counted once

    # A changed amount is refused, not added; a new row is applied.
    changed = csv_file(tmp_path, "changed.csv", [f"{alice},USD,1200", *rows[1:], f"{bob},EUR,5"])
    report = await run(deploy, importer.CsvSource(changed))
    assert report.outcomes.counts == {
        "already imported": 4,
        "rejected: command_id_reused": 1,
        "applied": 1,
    }
    assert report.outcomes.not_imported == [
        (Row(2, alice, "USD", 1200), "rejected: command_id_reused")
    ]
    assert report.exit_code() == 1
    assert f"line 2 ({alice}, USD, 1200): rejected: command_id_reused" in importer.render(report)
    assert await available(engine, alice) == {"USD": (1000, 1), "EUR": (250, 1)}
    assert await available(engine, bob) == {"USD": (7, 1), "EUR": (5, 1)}


async def test_bad_rows_are_reported_by_line_and_strict_imports_nothing(
    settings: Settings, engine: EngineProcess, unique: str, tmp_path: Path
) -> None:
    deploy = deployment(settings, engine)
    good, other, dup = (f"{n}-{unique}" for n in ("good", "other", "dup"))
    rows = [
        f"{good},USD,10",  # 2
        f"{good},EUR,1.5",  # 3
        f"{other},usd,5",  # 4
        f"{other},USD,0",  # 5
        f"no way-{unique},USD,5",  # 6
        f"{other},BTC,170141183460469231731687303715884105728",  # 7 (2^127)
        f"{other},ETH",  # 8
        f"{dup},USD,1",  # 9
        f"{dup},USD,2",  # 10
        f"{other},EUR,20",  # 11
        f"{other},GBP,-4,extra",  # 12
        f"{other},CHF,abc",  # 13
    ]
    path = csv_file(tmp_path, "bad.csv", rows)
    expected = [
        (3, "amount_fractional"),
        (4, "bad_asset"),
        (5, "amount_not_positive"),
        (6, "bad_account"),
        (7, "amount_too_large"),
        (8, "missing_field"),
        (9, "duplicate_row"),
        (10, "duplicate_row"),
        (12, "extra_field"),
        (13, "amount_not_a_number"),
    ]

    code, out, err = await run_cli(deploy, "import", "--strict", str(path), timeout_s=cli_timeout_s)
    assert code == 1, out + err
    listed = [line.split(": ")[:2] for line in out.splitlines() if line.startswith("  line ")]
    assert listed == [[f"  line {n}", problem] for n, problem in expected]
    assert "lines: 12 read, 2 good, 10 bad" in out and "--strict: nothing was produced" in out
    topic = engine.topics.commands
    assert await records_on(settings, topic.name, topic.partitions) == 0

    report = await run(deploy, importer.CsvSource(path))
    assert [(b.line, b.problem.value) for b in report.bad_rows] == expected
    assert (report.rows, report.good, report.bad, report.produced) == (12, 2, 10, 2)
    assert report.outcomes.counts == {"applied": 2} and report.exit_code() == 1
    assert await available(engine, good) == {"USD": (10, 1)}
    assert await available(engine, other) == {"EUR": (20, 1)}
    assert await available(engine, dup) == {}


async def test_a_postgresql_table_is_imported_through_a_cursor(
    settings: Settings, engine: EngineProcess, unique: str
) -> None:
    deploy = deployment(settings, engine)
    schema = f"legacy_{unique}"
    assets = ("USD", "EUR", "BTC", "ETH", "GBP")
    count = pg_fetch_rows + 500  # more than one round trip of the cursor
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(
            f"CREATE TABLE {schema}.balances (id serial PRIMARY KEY, account text, "
            "asset text, amount numeric(30, 0))"
        )
        await conn.copy_records_to_table(
            "balances",
            schema_name=schema,
            columns=["account", "asset", "amount"],
            records=[(f"pg-{unique}-{i % 500}", assets[i // 500], i + 1) for i in range(count)],
        )
        await conn.execute(
            f"INSERT INTO {schema}.balances (account, asset, amount) "
            f"VALUES ('pg-{unique}-x', 'USD', 0), ('pg-{unique}-x', NULL, 5)"
        )
        query = f"SELECT account, asset, amount FROM {schema}.balances ORDER BY id"
        report = await run(deploy, importer.PgSource.of(deploy, query))
        assert (report.rows, report.good, report.bad) == (count + 2, count, 2)
        assert [(b.line, b.problem) for b in report.bad_rows] == [
            (count + 1, Problem.AMOUNT_NOT_POSITIVE),
            (count + 2, Problem.MISSING_FIELD),
        ]
        assert report.outcomes.counts == {"applied": count} and report.exit_code() == 1
        assert "row 2501: amount_not_positive" in importer.render(report)
        assert await available(engine, f"pg-{unique}-7") == {
            asset: (7 + 500 * k + 1, 1) for k, asset in enumerate(assets)
        }

        code, out, err = await run_cli(
            deploy,
            "import",
            "--pg-query",
            query,
            "--pg-dsn",
            settings.pg_dsn,
            timeout_s=cli_timeout_s,
        )
        assert code == 1, out + err  # the two bad rows are still there
        assert f"already imported: {count:,}" in out and "applied" not in out
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


async def test_without_an_engine_no_wait_sends_and_waiting_gives_up(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    deploy = msgspec.structs.replace(settings, topic_prefix=f"imp-{unique}", partitions=2)
    path = csv_file(tmp_path, "opening.csv", [f"a-{unique},USD,1", f"b-{unique},USD,2"])
    report = await run(deploy, importer.CsvSource(path), wait=False)
    assert (report.produced, report.exit_code()) == (2, 0)
    assert "complete: all sent" in importer.render(report)

    report = await importer.run(
        deploy, importer.CsvSource(path), Options(stall_timeout_s=1.0), say=lambda _: None
    )
    assert (report.produced, report.unanswered, report.exit_code()) == (2, 2, 1)
    assert "not answered: 2" in importer.render(report)


# Failing fast means the import gives up by itself, after its own connect timeout at the
# most, and says why; the test's bound is generous on top of that and only turns a hang
# into a failure that says so.
fail_fast_bound_s = connect_timeout_s + 30


async def _gives_up(settings: Settings, *args: str) -> tuple[int, str, str]:
    try:
        return await run_cli(settings, *args, timeout_s=fail_fast_bound_s)
    except TimeoutError:
        pytest.fail(
            f"tally {' '.join(args)} did not give up by itself in {fail_fast_bound_s:.0f}s"
            f" (its connect timeout is {connect_timeout_s:.0f}s): it hangs"
        )


async def test_a_missing_file_or_service_fails_fast_on_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    code, out, err = await _gives_up(settings, "import", str(tmp_path / "nope.csv"))
    assert (code, out) == (2, "") and err.strip().splitlines() == [
        f"tally import: cannot read {tmp_path / 'nope.csv'}: No such file or directory"
    ]

    path = csv_file(tmp_path, "opening.csv", ["alice,USD,1"])
    dead = f"127.0.0.1:{free_port()}"
    code, out, err = await _gives_up(
        msgspec.structs.replace(settings, kafka_bootstrap=dead), "import", str(path)
    )
    assert (code, out) == (2, "") and len(err.strip().splitlines()) == 1
    assert err.startswith(f"tally import: Kafka unreachable at {dead}")

    dsn = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/tally"
    masked = r"^PostgreSQL unreachable at postgresql://postgres:\*\*\*@127\.0\.0\.1:"
    with pytest.raises(importer.ImportFailed, match=masked):
        async with asyncio.timeout(fail_fast_bound_s):
            await run(settings, importer.PgSource.of(settings, "SELECT 1", dsn=dsn))
