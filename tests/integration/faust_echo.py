"""A tiny Faust app for the compatibility test: counts records per key in a rocksdict
table and echoes each record with its count. Configured by FAUST_ECHO_* variables
because it runs as its own worker process (`faust -A tests.integration.faust_echo`)."""

from __future__ import annotations

import os

import faust

env = os.environ
app = faust.App(
    env["FAUST_ECHO_APP_ID"],
    broker=f"kafka://{env['FAUST_ECHO_BOOTSTRAP']}",
    store="rocksdb://",  # served by rocksdict
    datadir=env["FAUST_ECHO_DATADIR"],
    processing_guarantee=env["FAUST_ECHO_GUARANTEE"],
    topic_partitions=2,
    topic_replication_factor=1,
    web_enabled=False,
)
source = app.topic(env["FAUST_ECHO_IN"], key_serializer="raw", value_serializer="raw")
sink = app.topic(env["FAUST_ECHO_OUT"], key_serializer="raw", value_serializer="raw")
counts = app.Table("counts", default=int, partitions=2, key_type=bytes, value_type=int)


@app.agent(source)
async def echo(stream):  # type: ignore[no-untyped-def]
    async for event in stream.events():
        counts[event.key] += 1
        await sink.send(key=event.key, value=event.value + b"|%d" % counts[event.key])
