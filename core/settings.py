"""Settings: read once from TALLY_* environment variables at the entry point, validated, frozen.

Nothing else in the code base reads the environment; the `Settings` object is passed down.
msgspec does the type conversion and bounds checks (the same library that checks the wire
schema), this module only maps its errors back to the variable the user typed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from core.errors import CANNOT_RUN, TallyError

PREFIX = "TALLY_"

# Variables with the prefix that belong to other tools of the project (the local
# services script), so that they are not reported as unknown settings.
_FOREIGN = frozenset(
    {
        "TALLY_CACHE_DIR",
        "TALLY_CLIENT_KEY_ID",
        "TALLY_CLIENT_SECRET",
        "TALLY_FUZZ_EXAMPLES",
        "TALLY_KAFKA_PORT",
        "TALLY_KAFKA_CONTROLLER_PORT",
        "TALLY_PG_PORT",
        "TALLY_REDIS_PORT",
        "TALLY_REDIS_CLUSTER_PORT",
        "TALLY_REDIS_CLUSTER_NODE_TIMEOUT_MS",
        "TALLY_SERVICES_MODE",
        "TALLY_TEST_KEEP_TOPICS",
    }
)

_TOPIC_PREFIX = r"^[A-Za-z0-9_-]{1,40}$"
# "key-id:secret" pairs, comma separated: ids as in a header, secrets of 16+ printable
# characters without ',' (empty: no keys).
_KEYS = r"^([A-Za-z0-9_.-]{1,64}:[!-+\--~]{16,256}(,[A-Za-z0-9_.-]{1,64}:[!-+\--~]{16,256})*)?$"


class SettingsError(TallyError, ValueError):
    """A setting is missing, malformed or out of range; the message names the variable."""

    exit_code = CANNOT_RUN


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every knob of a Tally process. Defaults point at the local stack (`make services`)."""

    kafka_bootstrap: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1:9092"
    pg_dsn: Annotated[str, msgspec.Meta(pattern=r"^postgres(ql)?://")] = (
        "postgresql://postgres@127.0.0.1:5432/tally"
    )
    redis_url: Annotated[str, msgspec.Meta(pattern=r"^(redis|rediss|unix)://")] = (
        "redis://127.0.0.1:6379/0"
    )
    # redis_url is a node of a Redis Cluster: every Redis user (sink, reads, audit, tools)
    # then connects with the cluster client (sinks.redis_client). Database 0 only.
    redis_cluster: bool = False
    # Shards = partitions of every topic. Fixed for a deployment: changing it moves
    # accounts between shards, which is a migration (replay into new topics).
    partitions: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    topic_prefix: Annotated[str, msgspec.Meta(pattern=_TOPIC_PREFIX)] = "tally"
    # Every topic Tally creates gets this many replicas, and needs this many of them in
    # sync to acknowledge a write (min.insync.replicas; every producer uses acks=all).
    # 1/1 fits one broker; three brokers want 3/2 (one may fail, nothing acknowledged is
    # lost). Applied at creation only: an existing topic keeps its replicas (a warning
    # names one with fewer), since moving them is a reassignment for an operator.
    topic_replication: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    topic_min_insync_replicas: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    data_dir: Annotated[str, msgspec.Meta(min_length=1)] = ".cache/engine"
    web_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 6066
    # Where an engine worker's web server listens, and the host other workers use to
    # reach it (they forward reads to a shard's owner): empty means web_host, "auto"
    # this machine's own address (a container's, when workers run as replicas).
    web_host: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9.:-]{1,253}$")] = "127.0.0.1"
    web_advertised_host: Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z0-9.-]{1,253})?$")] = ""
    processing_guarantee: Literal["exactly_once", "at_least_once"] = "exactly_once"
    # How long a command_id is remembered: a repeat within this window is answered as a
    # duplicate; after it the record is pruned and the id may apply again. 0 keeps all.
    idempotency_retention_s: Annotated[int, msgspec.Meta(ge=0)] = 7 * 24 * 3600
    # N: each shard has N warm copies (at most one per other worker), each kept by
    # tailing the shard's changelog, so that a shard moved to a holder of a copy replays
    # only the tail. The group's leader picks the holders (`streams.placement`), spread
    # over the workers. Each copy costs its holder a changelog consumer's share and the
    # shard's disk; 0: none.
    table_standby_replicas: Annotated[int, msgspec.Meta(ge=0, le=8)] = 0
    # The worker's static member name in the engine's group; empty: derived from the
    # host name and the data directory (see `topics.names.engine_instance`).
    engine_instance_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{0,200}$")] = ""
    # Sinks: a batch is this many events, or what arrived within the linger.
    sink_batch_size: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 5000
    sink_linger_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 200
    # Each sink process's web server (/livez, /readyz, /metrics): the PostgreSQL sink on
    # one port, the Redis sink on the other, 0 for none. With `--processes N`, process
    # k (0-based) listens on port + 1 + k instead (the supervising parent serves none).
    sink_web_host: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9.:-]{1,253}$")] = "127.0.0.1"
    sink_postgres_web_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 6100
    sink_redis_web_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 6200
    # Log lines as text for people, or one JSON object per line for log shippers.
    log_format: Literal["text", "json"] = "text"
    # Ingress (HTTP). Client keys for request signatures: "key-id:secret,key-id:secret";
    # a secret is at least 16 characters. Never logged (see `redacted`).
    ingress_host: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    ingress_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8080
    ingress_keys: Annotated[str, msgspec.Meta(pattern=_KEYS)] = ""
    # Accept unsigned requests. For a laptop only; the ingress warns at every start.
    ingress_insecure: bool = False
    ingress_max_skew_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 300
    ingress_body_max_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = (
        4 * 1024 * 1024
    )
    # Per client key (per address when unsigned), per ingress process: commands (or
    # reads) a second, and the burst the bucket holds. 0 turns the limit off.
    ingress_rate_per_s: Annotated[int, msgspec.Meta(ge=0)] = 5000
    ingress_rate_burst: Annotated[int, msgspec.Meta(ge=1)] = 10000
    # How long the ingress waits for a request's whole body before answering 408 (a slow
    # or stalled client otherwise holds a handler and its buffer for as long as it likes).
    ingress_body_timeout_ms: Annotated[int, msgspec.Meta(ge=100, le=600_000)] = 10_000
    # How long a request waits for the broker's acknowledgement before answering 503.
    ingress_produce_timeout_ms: Annotated[int, msgspec.Meta(ge=100, le=120_000)] = 5000
    # Notifier (`tally notify`, #17). Subscription targets may be http and loopback or
    # private addresses: for tests and a laptop only (production: https, public hosts).
    notify_allow_private: bool = False
    notify_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 6070
    # One attempt's time limit; retries back off exponentially with full jitter from
    # first to max, until the horizon (since the first attempt), then the delivery is
    # parked as failed.
    notify_timeout_ms: Annotated[int, msgspec.Meta(ge=100, le=120_000)] = 5000
    notify_backoff_first_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 200
    notify_backoff_max_ms: Annotated[int, msgspec.Meta(ge=1, le=3_600_000)] = 60_000
    notify_retry_horizon_s: Annotated[int, msgspec.Meta(ge=0, le=7 * 24 * 3600)] = 3600
    # Per subscription: deliveries in flight at once (lanes; an account keeps to one,
    # so its deliveries stay in order) and events queued per lane before its reader waits.
    notify_concurrency: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    notify_queue_max: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 256
    # How often subscriptions are re-read from PostgreSQL and progress is stored.
    notify_refresh_ms: Annotated[int, msgspec.Meta(ge=50, le=60_000)] = 1000
    notify_progress_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 200
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def __post_init__(self) -> None:
        # Checks across fields (msgspec checks each field alone). Raised here, so that a
        # Settings built in code or by `msgspec.structs.replace` is checked too; `load`
        # reports it as it does the per-field errors.
        if self.topic_min_insync_replicas > self.topic_replication:
            raise SettingsError(
                f"{env_name('topic_min_insync_replicas')}={self.topic_min_insync_replicas} "
                f"is more than {env_name('topic_replication')}={self.topic_replication}: "
                "a topic cannot have more in-sync replicas than replicas, and every write "
                "to it would be refused"
            )

    def client_keys(self) -> dict[str, bytes]:
        """key id -> secret, from `ingress_keys`."""
        pairs = (item.split(":", 1) for item in self.ingress_keys.split(",") if item)
        return {key_id: secret.encode() for key_id, secret in pairs}

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with passwords in DSNs and URLs masked, for logs."""
        out = msgspec.structs.asdict(self)
        for key in ("pg_dsn", "redis_url", "kafka_bootstrap"):
            out[key] = re.sub(r"(://[^:/@]*:).*@", r"\1***@", out[key])
        out["ingress_keys"] = ",".join(f"{key_id}:***" for key_id in self.client_keys())
        return out


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def to_env(settings: Settings) -> dict[str, str]:
    """The TALLY_* variables that `load` reads back into these same settings: how a
    process hands its settings (or changed ones) to a child process."""
    return {env_name(k): str(v) for k, v in msgspec.structs.asdict(settings).items()}


def child_env(settings: Settings) -> dict[str, str]:
    """This process's environment without its own TALLY_* variables, plus `settings`."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(PREFIX)},
        **to_env(settings),
    }


def load(environ: Mapping[str, str]) -> Settings:
    """Build Settings from an environment mapping; raise SettingsError naming the bad variable."""
    fields = {f.name for f in msgspec.structs.fields(Settings)}
    known = {env_name(f) for f in fields} | _FOREIGN
    # Names are matched exactly: TALLY_Partitions is a typo, not TALLY_PARTITIONS.
    unknown = sorted(k for k in environ if k.upper().startswith(PREFIX) and k not in known)
    if unknown:
        # A typo in a variable name would otherwise silently fall back to a default.
        raise SettingsError(f"unknown setting {unknown[0]} (known: {_known_names(fields)})")
    raw: dict[str, Any] = {}
    for name in fields:
        value = environ.get(env_name(name))
        if value is not None:
            raw[name] = value.strip()
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_explain(exc, raw)) from None


_PLAIN = {
    "Expected `int`, got `str`": "expected a whole number",
    "Expected `str`, got `int`": "expected text",
}


_SECRET = {
    "ingress_keys": "expected key-id:secret pairs separated by ',' (ids of [A-Za-z0-9_.-], "
    "secrets of 16-256 printable characters without ',')",
}


def _known_names(fields: set[str]) -> str:
    return ", ".join(sorted(env_name(f) for f in fields))


def _explain(exc: msgspec.ValidationError, raw: Mapping[str, Any]) -> str:
    message = str(exc)
    match = re.search(r"at `\$\.(\w+)`", message)
    if not match:
        return f"bad settings: {message}"
    field = match.group(1)
    problem = message[: match.start()].rstrip(" -")
    problem = _PLAIN.get(problem, problem)
    if field in _SECRET:
        # The value holds secrets: name the rule, never echo it.
        return f"bad setting {env_name(field)} (value not shown): {_SECRET[field]}"
    return f"bad setting {env_name(field)}={raw.get(field)!r}: {problem}"
