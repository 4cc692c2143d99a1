"""The chaos harness: several engine workers in one consumer group under a seeded load,
broken on a seeded schedule, then checked for nothing lost and nothing doubled.

One run:
1. A deployment of its own (topic prefix `chaos-<seed>-<id>`, a PostgreSQL schema of that
   name, Redis database `redis_db` which the run may flush whole), 2-3 `tally engine`
   processes in one group (each its own state directory and web port), and the
   PostgreSQL and Redis sinks.
2. A bounded load: `harness.workload` records from the seed (transfers that mostly cross
   shards, disbursements, holds with captures, releases and expiries, settings, exact
   repeats, reused ids and undecodable garbage), produced with acks=all at a fixed rate
   for a fixed time. A send that fails is sent again, as any client would: a repeat
   that Kafka had in fact taken is then answered `duplicate`.
3. Faults on a schedule drawn from the seed while the load runs: `kill -9` of a worker
   (restarted after a moment, sometimes without its state directory), SIGSTOP of a
   worker past its session timeout then SIGCONT (a zombie: its shards have moved on and
   it must not publish anything for them), a worker added, the Kafka broker restarted,
   PostgreSQL restarted, Redis flushed; on the local clusters also one broker killed or
   paused and a Redis master killed (harness.cluster).
4. Heal (every worker running), wait until the workers' watchdogs show no lag and the
   sinks have drained, read every topic back from offset 0 and check (`Check`): one
   result per command record, one decision per (account, command id), one result per
   internal command, every balance's seq 1..n once, conservation per asset, dead letters exactly
   the garbage, the final balances of the events in PostgreSQL, and `tally audit`
   (the ledger recomputes every balance; PostgreSQL, Redis and the engine agree).

A failed run prints its seed and schedule: `tally chaos --seed S --duration D` runs the
same load and faults again (timings on a busy machine differ, the plan does not). A run
in which a planned fault was not injected fails too.

The modules, in the order of a run: `plan` (the seeded schedule), `harness` (one run,
start to end), `workers` (the engine processes), `load` (the seeded records), `inject`
(the faults), `waits` (how long results waited around each fault, on the shards kept
and moved), `checks` (what the topics read back must show), `record` (what the run did
and found, and its printed report).
"""

from __future__ import annotations

from harness.chaos.checks import (
    _check_conservation,
    _check_dead_letters,
    _check_results,
    _check_seq,
)
from harness.chaos.harness import Harness, chaos_settings
from harness.chaos.plan import KINDS, MAX_WORKERS, PARTITIONS, SHORT_KINDS, Fault, plan
from harness.chaos.record import ChaosError, Run, Zombie, render

# The CLI and the tests use the harness through these names; the checks' unit tests
# call the check functions on made-up histories.
__all__ = [
    "KINDS",
    "MAX_WORKERS",
    "PARTITIONS",
    "SHORT_KINDS",
    "ChaosError",
    "Fault",
    "Harness",
    "Run",
    "Zombie",
    "_check_conservation",
    "_check_dead_letters",
    "_check_results",
    "_check_seq",
    "chaos_settings",
    "plan",
    "render",
]
