"""A start-up that asks for more replicas than the cluster has brokers ends with one line
naming the setting and the topics family's status, before anything is created: here on
the single broker, with TALLY_TOPIC_REPLICATION=3, for the sinks, the ingress and the engine
worker alike."""

from __future__ import annotations

import msgspec
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from core.errors import CANNOT_RUN
from core.settings import Settings
from harness.procs import run_cli


async def _brokers(bootstrap: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return len((await admin.describe_cluster())["brokers"])
    finally:
        await admin.close()


@pytest.mark.parametrize(
    "args", [("sink", "redis"), ("ingress",), ("engine",)], ids=["sink", "ingress", "engine"]
)
async def test_more_replicas_than_brokers_ends_the_start_in_one_line(
    settings: Settings, unique: str, args: tuple[str, ...]
) -> None:
    brokers = await _brokers(settings.kafka_bootstrap)
    local = msgspec.structs.replace(
        settings,
        topic_prefix=f"rf-{unique}",
        topic_replication=brokers + 1,
        ingress_insecure=True,
        sink_redis_web_port=0,
    )
    code, _out, err = await run_cli(local, *args, timeout_s=60)
    assert code == CANNOT_RUN, err
    assert f"TALLY_TOPIC_REPLICATION={brokers + 1} but the Kafka cluster has {brokers}" in err
    assert "Traceback" not in err
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        assert not [t for t in await admin.list_topics() if t.startswith(local.topic_prefix)]
    finally:
        await admin.close()
