"""Incremental fetch sessions (Kafka's KIP-227) for an aiokafka consumer.

aiokafka sends every fetch as a full one: each request lists every fetchable partition
of the node, and each response carries every one of them back, data or not. A worker
with 64 shards reads 128 partitions (commands and internal); at a paced rate most of
them are idle, and listing them costs the broker and the worker each fetch, several
hundred fetches a second, on the same two cores that decide the commands. Measured
before this module (`tally bench engine`, paced phase, 64 partitions): the worker at
0.65 of a core and the broker at 0.65 for 200 commands/s, against 0.54 and 0.57 at 8
partitions; aiokafka's fetcher 29% of the worker's samples. With sessions a paced answer
carries 1.1 partitions instead of 128; the CPU saved was small (worker 0.65 of a core
against 0.71, broker 0.57 against 0.55, alternated): aiokafka still walks every assigned
partition in Python to build each request.

With a session, the broker keeps the partitions and their fetch offsets between
requests: a request names only the partitions whose offset changed and the ones to
forget, and a response only the partitions with records or with a changed high
watermark (what Kafka's own Java consumer does, `FetchSessionHandler`).

`FetchSession` is the bookkeeping for one broker, with no I/O: what the broker's session
holds, the request that changes it into what the fetcher wants now, and what the answer
does to it. Kafka's rules it follows:
- session id 0 and epoch 0 ask for a new session, with every partition listed; the
  broker answers with the session's id (0: it made none, and the next request asks
  again);
- after that, the id and the epoch, which goes up by one per answered request (after
  2^31-1 comes 1), name the partitions whose fetch offset changed (or that are new to
  the session) and forget those the fetcher no longer wants (paused, buffered, revoked);
- any error answer (a session the broker evicted, an epoch it did not expect), a request
  that failed or was cancelled, and so might or might not have reached the broker, ends
  the session here: the next request is a full one that asks for a new session. The
  old one, if the broker still has it, ages out of its cache.
A request built while another is unanswered (never by aiokafka's fetcher, which keeps
one fetch per node in flight) is a full fetch outside the session (epoch -1), so that
the session is never changed by two requests at once.

`streams.kafka_internals.use_fetch_sessions` puts sessions under a started consumer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka.structs import TopicPartition

log = logging.getLogger(__name__)

# KIP-227's values.
NO_SESSION = 0
INITIAL_EPOCH = 0
FINAL_EPOCH = -1
EPOCH_MAX = 2**31 - 1
# A wanted partition: (topic-partition, fetch offset, max bytes).
Wanted = tuple[TopicPartition, int, int]


def next_epoch(epoch: int) -> int:
    """The epoch after `epoch` (wraps past 2^31-1 to 1; 0 is only ever the first)."""
    return 1 if epoch >= EPOCH_MAX else epoch + 1


@dataclass(frozen=True)
class Plan:
    """One fetch request's session fields: the session id and epoch to send, the
    partitions to list and to forget, and what the session holds once it is answered."""

    session_id: int
    epoch: int
    send: list[Wanted]
    forget: list[TopicPartition]
    holds: dict[TopicPartition, tuple[int, int]]

    @property
    def full(self) -> bool:
        return self.epoch in (INITIAL_EPOCH, FINAL_EPOCH)


class FetchSession:
    """The client's side of one broker's fetch session (see the module's docstring)."""

    def __init__(self) -> None:
        self.id = NO_SESSION
        self.epoch = INITIAL_EPOCH
        # What the broker's session holds: partition -> (fetch offset, max bytes).
        self.partitions: dict[TopicPartition, tuple[int, int]] = {}
        self._outstanding: Plan | None = None
        # How many requests were full and incremental, and sessions ended by an error.
        self.full_requests = 0
        self.incremental_requests = 0
        self.ended = 0

    def plan(self, wanted: Iterable[Wanted]) -> Plan:
        """The session fields of the next request for the partitions `wanted` now."""
        holds = {tp: (offset, max_bytes) for tp, offset, max_bytes in wanted}
        everything = [(tp, offset, max_bytes) for tp, (offset, max_bytes) in holds.items()]
        if self._outstanding is not None:
            return Plan(NO_SESSION, FINAL_EPOCH, everything, [], {})
        if self.id == NO_SESSION:
            plan = Plan(NO_SESSION, INITIAL_EPOCH, everything, [], holds)
        else:
            changed = [w for w in everything if self.partitions.get(w[0]) != w[1:]]
            forget = [tp for tp in self.partitions if tp not in holds]
            plan = Plan(self.id, self.epoch, changed, forget, holds)
        self._outstanding = plan
        return plan

    def answered(self, plan: Plan, error_code: int, session_id: int) -> None:
        """The broker answered `plan`'s request with this top-level error and session id."""
        if plan is not self._outstanding:
            return  # a fetch outside the session: it changed nothing here
        self._outstanding = None
        if error_code != 0:
            self._end(f"error {error_code}")
            return
        if plan.full:
            self.full_requests += 1
            self.id = session_id
            self.epoch = next_epoch(INITIAL_EPOCH) if session_id != NO_SESSION else INITIAL_EPOCH
        else:
            self.incremental_requests += 1
            self.epoch = next_epoch(self.epoch)
        self.partitions = dict(plan.holds) if self.id != NO_SESSION else {}

    def failed(self, plan: Plan) -> None:
        """`plan`'s request got no answer (a connection error, a timeout, cancelled):
        whether the broker saw it is unknown, so the session ends here."""
        if plan is not self._outstanding:
            return
        self._outstanding = None
        self._end("no answer")

    def _end(self, why: str) -> None:
        if self.id != NO_SESSION:
            self.ended += 1
            log.info("fetch session %d ended (%s); the next fetch lists every partition",
                     self.id, why)  # fmt: skip
        self.id = NO_SESSION
        self.epoch = INITIAL_EPOCH
        self.partitions = {}
