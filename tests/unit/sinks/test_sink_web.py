"""A sink's web server without Kafka: its metric names and labels, readiness from the
store's ping and the assignment, and the ports of `tally sink --processes N`."""

from __future__ import annotations

import msgspec
from prometheus_client import generate_latest

from core.settings import Settings
from sinks import service
from sinks.runner import Batch, SinkRunner
from sinks.web import SinkWeb
from topics.specs import topics_for


class _Store:
    name = "postgres"
    unavailable: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, up: bool = True) -> None:
        self.up = up

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def offsets(self, topic: str) -> dict[int, int]:
        return {}

    async def write(self, batch: Batch) -> None: ...

    async def ping(self, timeout_s: float) -> None:
        if not self.up:
            raise ConnectionRefusedError("down")


def _web(store: _Store) -> SinkWeb:
    runner = SinkRunner(store, bootstrap="127.0.0.1:1", topics=topics_for("u", 2), group_id="g")
    return SinkWeb(runner, "postgres", "127.0.0.1", 0)


def test_metrics_are_named_like_the_engines_with_a_target_label() -> None:
    web = _web(_Store())
    web.runner.batches, web.runner.dead_lettered = 3, 2
    web.write_seconds.observe(0.02)
    web.last_lag = {0: 5, 1: 0}
    text = generate_latest(web.registry).decode()
    assert 'tally_sink_batches_total{target="postgres"} 3.0' in text
    assert 'tally_sink_dead_letters_total{target="postgres"} 2.0' in text
    assert 'tally_sink_partition_lag{partition="0",target="postgres",topic="u.events"} 5.0' in text
    assert 'tally_sink_write_duration_seconds_count{target="postgres"} 1.0' in text
    for name in ("tally_sink_outages_total", "tally_sink_rebuilds_total", "tally_sink_ready",
                 "tally_sink_store_down", "tally_sink_events_total"):  # fmt: skip
        assert f'{name}{{target="postgres"}}' in text, name
    assert "_created" not in text


async def test_not_ready_without_partitions_or_with_the_store_down() -> None:
    web = _web(_Store())
    assert (await web.checks())["consumer"] == "no partitions assigned"
    assert not web.last_ready
    down = _web(_Store(up=False))
    checks = await down.checks()
    assert checks["store"] == "unavailable (ConnectionRefusedError)"
    down.runner.down_since = 1.0  # an outage the runner is waiting out
    assert (await down.checks())["store"] == "unavailable (the sink is retrying it)"


def test_each_sink_process_gets_a_port_of_its_own() -> None:
    settings = msgspec.structs.replace(Settings(), partitions=8)
    shares = service.split(8, 3)
    ports = [
        int(c[c.index("--web-port") + 1]) for c in service.child_commands(settings, "redis", shares)
    ]
    assert ports == [6201, 6202, 6203]
    off = msgspec.structs.replace(settings, sink_postgres_web_port=0)
    commands = service.child_commands(off, "postgres", shares)
    assert [c[c.index("--web-port") + 1] for c in commands] == ["0", "0", "0"]
