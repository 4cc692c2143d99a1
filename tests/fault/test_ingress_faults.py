"""The ingress with a dependency gone: 503 with Retry-After and /readyz naming it while
Kafka or PostgreSQL is stopped, normal answers once it is back, and nothing answered
202 lost or applied twice."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from harness import faults
from harness.collector import read_all
from harness.procs import EngineProcess, IngressProcess
from ingress.client import Client
from topics.codec import decode_command
from topics.schema import Deposit
from topics.specs import topics_for

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]
KEY_ID, SECRET = "fault-client", "fault-secret-0123456789"
# The ingress gives up on Kafka after its produce timeout (2 s here) and answers 503;
# a request still unanswered after this long is hanging, not failing fast. Generous, so
# that a loaded machine does not fail it; far below the client's own 40 s timeout.
FAIL_FAST_BOUND_S = 20.0


def _deposit(command_id: str, account: str) -> dict[str, object]:
    return {"kind": "deposit", "command_id": command_id, "account": account, "asset": "USD",
            "amount": 1}  # fmt: skip


async def test_kafka_stopped_gives_503_then_202_when_it_returns(
    settings: Settings, unique: str, tmp_path: Path, local_broker: faults.Broker
) -> None:
    prefix = f"fk-{unique}"
    engine = EngineProcess(settings, prefix=prefix, data_dir=tmp_path / "engine", partitions=2)
    ingress = IngressProcess(
        settings, prefix=prefix, log_path=tmp_path / "ingress.log", partitions=2,
        keys={KEY_ID: SECRET}, ingress_produce_timeout_ms=2000,
    )  # fmt: skip
    account = f"acct-{unique}"
    found = local_broker  # found (or failed for) before anything was started
    try:
        await engine.start()
        await ingress.start()
        async with Client(ingress.url, KEY_ID, SECRET) as tally:
            before = await tally.submit(_deposit("before", account), wait=10)
            assert before.status == 200, before
            await faults.stop_broker(found)  # SIGTERM: a clean stop, as an operator would
            try:
                async with asyncio.timeout(FAIL_FAST_BOUND_S):
                    down = await tally.submit(_deposit("during", account))
            except TimeoutError:
                pytest.fail(
                    f"no answer {FAIL_FAST_BOUND_S:.0f}s into a Kafka outage: the ingress"
                    " hangs on the produce instead of failing fast with a 503"
                )
            assert down.status == 503, down
            assert down.headers["Content-Type"] == "application/problem+json"
            assert down.body["field"] == "kafka" and int(down.headers["Retry-After"]) >= 1
            ready = await tally.request("GET", "/readyz")
            assert ready.status == 503 and ready.body["failing"] == ["kafka"], ready
            batch = await tally.submit_batch([_deposit("during-b", account)])
            assert batch.status == 503 and batch.body["unavailable"] == 1, batch

            await faults.start_services(found.cache_dir)
            deadline = time.monotonic() + 90
            after = None
            while time.monotonic() < deadline:
                after = await tally.submit(_deposit("after", account), wait=10)
                if after.status != 503:
                    break
                await asyncio.sleep(1)
            assert after is not None and after.status in (200, 202), after
            assert (await tally.request("GET", "/readyz")).status == 200

            # "during" and "during-b" were answered 503: each may or may not have
            # landed. Retried with the same ids they apply once in all, never twice.
            for command_id in ("during", "during-b"):
                retry = await tally.submit(_deposit(command_id, account), wait=15)
                assert retry.status == 200, retry
                assert retry.body["status"] in ("applied", "duplicate"), retry
            strong = await tally.balances(account, strong=True)
            assert strong.body["balances"]["USD"] == {"available": 4, "held": 0, "seq": 4}
    finally:
        await ingress.stop()
        await engine.stop()


async def _on_topic(settings: Settings, prefix: str, command_id: str) -> list[Any]:
    """The commands on the deployment's commands topic that carry `command_id`."""
    topic = topics_for(prefix, 2).commands.name
    records, _ = await read_all(settings.kafka_bootstrap, topic, 2, timeout_s=60)
    found = [decode_command(r.value or b"") for r in records]
    return [c for c in found if getattr(c, "command_id", None) == command_id]


async def test_postgres_stopped_gives_503_on_reads_of_it_and_commands_still_flow(
    settings: Settings, unique: str, tmp_path: Path, local_postgres: faults.PgCluster
) -> None:
    prefix = f"fp-{unique}"
    ingress = IngressProcess(settings, prefix=prefix, log_path=tmp_path / "ingress.log",
                             partitions=2, keys={KEY_ID: SECRET})  # fmt: skip
    cluster = local_postgres  # found (or failed for) before the ingress was started
    stopped = False
    account = f"acct-{unique}"
    try:
        await ingress.start()
        async with Client(ingress.url, KEY_ID, SECRET) as tally:
            assert (await tally.result("nothing-yet")).status == 404
            await faults.stop_postgres(cluster)
            stopped = True
            down = await tally.result("nothing-yet")
            assert down.status == 503 and down.body["field"] == "postgres", down
            assert int(down.headers["Retry-After"]) >= 1
            ready = await tally.request("GET", "/readyz")
            assert ready.status == 503 and ready.body["failing"] == ["postgres"], ready
            # Commands need Kafka only: still accepted, and on the commands topic (read
            # back while PostgreSQL is still down) as the command that was sent.
            accepted = await tally.submit(_deposit("pg-down", account))
            assert accepted.status == 202, accepted
            flowed = await _on_topic(settings, prefix, "pg-down")
            assert len(flowed) == 1 and isinstance(flowed[0], Deposit), flowed
            assert (flowed[0].account, flowed[0].asset, flowed[0].amount) == (account, "USD", 1)
            await faults.start_postgres(cluster)
            stopped = False
            deadline = time.monotonic() + 30
            while (await tally.result("nothing-yet")).status != 404:
                assert time.monotonic() < deadline, "reads never recovered"
                await asyncio.sleep(0.5)
            assert (await tally.request("GET", "/readyz")).status == 200
    finally:
        if stopped:
            await faults.start_postgres(cluster)
        await ingress.stop()
