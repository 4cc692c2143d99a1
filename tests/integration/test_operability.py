"""Every process answers /livez, /readyz and /metrics, starts with one structured line
and no WARNING or ERROR, and the dashboards and alerts only query metrics the
processes really export.

One deployment for the module (an engine worker, the ingress, both sinks, on topics of
its own) with a few commands through it, so that every counter has moved."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml

from core.settings import Settings
from harness.collector import Collector
from harness.procs import EngineProcess, IngressProcess, SinkProcess, command, produce
from sinks import service, verify
from tests.integration.stack_support import scratch, started
from topics.names import schema_name
from topics.schema import Deposit, Transfer

PARTITIONS = 4
ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
KEY_ID, SECRET = "ops-test", "ops-test-secret-0123456789"


@dataclass
class Deployment:
    engine: EngineProcess
    ingress: IngressProcess
    sinks: dict[str, SinkProcess]

    def urls(self) -> dict[str, str]:
        return {
            "engine": f"http://127.0.0.1:{self.engine.port}",
            "ingress": self.ingress.url,
            **{f"sink {t}": s.url for t, s in self.sinks.items()},
        }

    def logs(self) -> dict[str, str]:
        return {
            "engine": self.engine.tail(100_000),
            "ingress": self.ingress.tail(100_000),
            **{f"sink {t}": s.tail(100_000) for t, s in self.sinks.items()},
        }


@pytest.fixture(scope="module")
async def deployment(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployment]:
    d = scratch(settings, tmp_path_factory, "ops", PARTITIONS)
    engine, ingress = d.engine(), d.ingress("ingress", keys={KEY_ID: SECRET})
    sinks = {
        target: SinkProcess(
            settings,
            target,
            prefix=d.prefix,
            log_path=d.tmp / f"sink-{target}.log",
            partitions=PARTITIONS,
        )
        for target in service.TARGETS
    }
    collector = Collector(settings.kafka_bootstrap, engine.topics)
    local = d.settings
    try:
        async with started(*([proc] for proc in (engine, ingress, *sinks.values()))):
            await collector.start(from_end=False)
            await _move_every_counter(settings, engine, collector)
            yield Deployment(engine, ingress, sinks)
    finally:
        await collector.stop()
        await verify.drop(local.pg_dsn, schema_name(local), local.redis_url, d.prefix)


async def _move_every_counter(
    settings: Settings, engine: EngineProcess, collector: Collector
) -> None:
    """A few deposits and transfers through the deployment, answered."""
    accounts = [f"ops-{i}" for i in range(8)]
    commands = [
        Deposit(command_id=f"d{i}", account=a, asset="USD", amount=100)
        for i, a in enumerate(accounts)
    ] + [
        Transfer(command_id=f"t{i}", account=a, to=accounts[(i + 3) % 8], asset="USD", amount=5)
        for i, a in enumerate(accounts)
    ]
    await produce(settings.kafka_bootstrap, engine.topics.commands.name,
                  [command(c) for c in commands])  # fmt: skip
    assert await collector.wait_for(
        lambda r: sum(len(v) for v in r.by_id.values()) >= 16, timeout_s=60, say=print
    )


async def _get(url: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        return response.status, await response.text()


def _families(text: str) -> set[str]:
    """The metric names of a Prometheus text scrape, with each sample's own name
    (`x_total`, `x_bucket`...) as well as the family's."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


async def test_every_process_answers_livez_readyz_and_metrics(deployment: Deployment) -> None:
    for name, url in deployment.urls().items():
        assert (await _get(f"{url}/livez"))[0] == 200, name
        status, body = await _get(f"{url}/readyz")
        assert status == 200, (name, body)
        status, text = await _get(f"{url}/metrics")
        assert status == 200, name
        assert any(n.startswith("tally_") for n in _families(text)), (name, text[:500])


async def test_sinks_export_lag_batches_latency_outages_rebuilds_dead_letters(
    deployment: Deployment,
) -> None:
    for target, sink in deployment.sinks.items():
        deadline = time.monotonic() + 30
        while True:
            _, text = await _get(f"{sink.url}/metrics")
            batches = re.search(
                rf'^tally_sink_batches_total{{target="{target}"}} (\S+)$', text, re.M
            )
            if (batches and float(batches.group(1)) > 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert batches and float(batches.group(1)) > 0, text
        lag = rf'^tally_sink_partition_lag{{partition="(\d+)",target="{target}",'
        lags = re.findall(lag, text, re.M)
        assert sorted(int(p) for p in lags) == list(range(PARTITIONS)), text
        for name in ("tally_sink_write_duration_seconds_count", "tally_sink_outages_total",
                     "tally_sink_rebuilds_total", "tally_sink_dead_letters_total",
                     "tally_sink_ready", "tally_sink_store_down"):  # fmt: skip
            assert re.search(rf'^{name}{{target="{target}"}} ', text, re.M), (name, text)
        body = json.loads((await _get(f"{sink.url}/readyz"))[1])
        assert body["checks"] == {"store": "ok", "consumer": "ok"}
        assert body["partitions"] == list(range(PARTITIONS))


def test_each_process_logs_one_start_line_and_no_warning_or_error(
    deployment: Deployment,
) -> None:
    for name, text in deployment.logs().items():
        starts = [line for line in text.splitlines() if " starting: tally " in line]
        assert len(starts) == 1, (name, starts)
        assert '"pg_dsn"' in starts[0] and '"partitions":4' in starts[0], starts[0]
        assert SECRET not in text, name  # the client keys are masked
        bad = [line for line in text.splitlines() if re.search(r" (WARNING|ERROR|CRITICAL) ", line)]
        assert not bad, (name, bad)
        aiokafka_info = [line for line in text.splitlines() if " INFO aiokafka" in line]
        assert not aiokafka_info, (name, aiokafka_info[:5])


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana" / "tally.json").read_text())
    queries = []
    for panel in dashboard["panels"]:
        queries += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    return queries


def _alert_queries() -> list[str]:
    rules = yaml.safe_load((MONITORING / "prometheus" / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\btally_[a-z0-9_]+", expr))


async def test_dashboard_and_alerts_query_only_exported_metrics(deployment: Deployment) -> None:
    exported: set[str] = set()
    for url in deployment.urls().values():
        exported |= _families((await _get(f"{url}/metrics"))[1])
    queries = _dashboard_queries() + _alert_queries()
    assert len(_dashboard_queries()) >= 8 and len(_alert_queries()) >= 4
    for expr in queries:
        used = _metrics_in(expr)
        assert used, f"a query names no tally metric: {expr}"
        missing = used - exported
        assert not missing, f"{expr} names {sorted(missing)}, not exported"
