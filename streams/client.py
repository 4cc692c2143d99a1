"""What the engine publishes for those who talk to its workers: how a worker names
itself in the consumer group (its client id carries its web address), who serves which
shard right now, the URL of an account's table view on its owner, and the wire format
of a shard's pages. The ingress and `tally audit` use this module, never the engine's
internals."""

from __future__ import annotations

import time

import msgspec
import yarl
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocol

from topics.ids import path_segment

CLIENT_ID_PREFIX = "tally-engine-"
owners_ttl_s = 2.0
# A page of a shard's balances is read synchronously on the loop the engine also runs
# on: 10,000 rows take about 10 ms, a pause the engine's batches hardly notice.
shard_page_limit_max = 10_000


class BalanceRow(msgspec.Struct, frozen=True):
    """One balance as the shard endpoint lists it (`tally audit` decodes the same type)."""

    account: str
    asset: str
    available: int
    held: int
    seq: int


class ShardPage(msgspec.Struct, frozen=True):
    """A page of one shard's balances in key order; `next` is the `after` of the next
    page, or None at the end of the shard."""

    shard_id: int
    balances: list[BalanceRow]
    next: str | None


def client_id_for(host: str, port: int) -> str:
    """The consumer client id that tells other workers where this one's web server is."""
    return f"{CLIENT_ID_PREFIX}{host}-{port}"


def _address_of(client_id: str) -> str | None:
    if not client_id.startswith(CLIENT_ID_PREFIX):
        return None
    host, _, port = client_id[len(CLIENT_ID_PREFIX) :].rpartition("-")
    return f"http://{host}:{port}" if host and port.isdigit() else None


def account_url(owner: str, account: str) -> yarl.URL:
    """The owner's table view of `account`, marked as forwarded. Encoded by hand: an
    account id may be "." or "..", which a URL library would resolve as a path step."""
    return yarl.URL(f"{owner}/balances/{path_segment(account)}?forwarded=1", encoded=True)


class ShardOwners:
    """Which engine worker serves which shard, from the engine group's description in
    Kafka, cached for `owners_ttl_s` (forgotten when an owner stops answering)."""

    def __init__(self, bootstrap: str, group_id: str, commands_topic: str) -> None:
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.commands_topic = commands_topic
        self._owners: dict[int, str] = {}
        self._at = 0.0

    async def of(self, shard: int) -> str | None:
        """The web address of the worker assigned `shard`, or None if nobody is."""
        if time.monotonic() - self._at > owners_ttl_s:
            self._owners = await self._describe()
            self._at = time.monotonic()
        return self._owners.get(shard)

    def forget(self) -> None:
        self._at = 0.0

    async def _describe(self) -> dict[int, str]:
        """shard -> web address of the group member assigned the shard's commands."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            responses = await admin.describe_consumer_groups([self.group_id])
        finally:
            await admin.close()
        owners: dict[int, str] = {}
        for response in responses:
            for group in response.groups:
                for member in group[5]:
                    client_id, raw_assignment = member[1], member[-1]
                    address = _address_of(client_id)
                    if address is None or not raw_assignment:
                        continue
                    assignment = ConsumerProtocol.ASSIGNMENT.decode(raw_assignment)
                    for topic, partitions in assignment.assignment:
                        if topic == self.commands_topic:
                            owners.update(dict.fromkeys(partitions, address))
        return owners
