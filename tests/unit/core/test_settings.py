"""Settings come only from TALLY_* variables, and every mistake names the variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from core.settings import Settings, SettingsError, load, to_env

ROOT = Path(__file__).resolve().parents[3]
TALLY = Path(sys.executable).parent / "tally"


def test_defaults_with_an_empty_environment() -> None:
    got = load({})
    assert got == Settings()
    assert got.partitions == 8
    assert got.kafka_bootstrap == "127.0.0.1:9092"
    assert got.pg_dsn == "postgresql://postgres@127.0.0.1:5432/tally"
    assert got.redis_url == "redis://127.0.0.1:6379/0"
    assert got.topic_prefix == "tally"
    assert got.processing_guarantee == "exactly_once"
    assert got.log_level == "INFO"
    assert got.web_port == 6066


def test_unrelated_variables_are_ignored() -> None:
    assert load({"PATH": "/bin", "HOME": "/root", "TALLYHO": "x"}) == Settings()


def test_values_are_read_converted_and_stripped() -> None:
    got = load(
        {
            "TALLY_PARTITIONS": " 16 ",
            "TALLY_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
            "TALLY_PG_DSN": "postgres://u:p@db/x",
            "TALLY_REDIS_URL": "rediss://cache:6380/1",
            "TALLY_LOG_LEVEL": "DEBUG",
            "TALLY_PROCESSING_GUARANTEE": "at_least_once",
            "TALLY_WEB_PORT": "8080",
        }
    )
    assert got.partitions == 16
    assert got.kafka_bootstrap == "k1:9092,k2:9092"
    assert got.pg_dsn == "postgres://u:p@db/x"
    assert got.redis_url == "rediss://cache:6380/1"
    assert got.log_level == "DEBUG"
    assert got.processing_guarantee == "at_least_once"
    assert got.web_port == 8080


@pytest.mark.parametrize("value", ["1", "256"])
def test_partition_bounds_are_inclusive(value: str) -> None:
    assert load({"TALLY_PARTITIONS": value}).partitions == int(value)


@pytest.mark.parametrize("value", ["abc", "0", "257", "-1", "1.5", ""])
def test_bad_partitions_name_the_variable(value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load({"TALLY_PARTITIONS": value})
    assert "TALLY_PARTITIONS" in str(info.value)


def test_non_number_partitions_says_so_plainly() -> None:
    with pytest.raises(SettingsError, match="TALLY_PARTITIONS='abc': expected a whole number"):
        load({"TALLY_PARTITIONS": "abc"})


def test_misspelt_variable_is_reported_as_unknown_by_name() -> None:
    with pytest.raises(SettingsError) as info:
        load({"TALLY_PARTITION": "4"})
    message = str(info.value)
    assert "unknown setting TALLY_PARTITION " in message
    assert "TALLY_PARTITIONS" in message  # the known names are listed


def test_wrong_case_variable_is_not_silently_ignored() -> None:
    # Environment names are case-sensitive: TALLY_Partitions is not TALLY_PARTITIONS, and
    # must not silently fall back to the default.
    try:
        got = load({"TALLY_Partitions": "4"})
    except SettingsError as exc:
        assert "TALLY_Partitions" in str(exc)
    else:
        assert got.partitions == 4, "TALLY_Partitions=4 was ignored without a word"


@pytest.mark.parametrize(
    "name",
    [
        "TALLY_CACHE_DIR",
        "TALLY_KAFKA_PORT",
        "TALLY_PG_PORT",
        "TALLY_REDIS_PORT",
        "TALLY_TEST_KEEP_TOPICS",
    ],
)
def test_variables_of_the_services_script_are_not_reported(name: str) -> None:
    assert load({name: "/somewhere"}) == Settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TALLY_PG_DSN", "mysql://root@localhost/tally"),
        ("TALLY_PG_DSN", "127.0.0.1:5432"),
        ("TALLY_REDIS_URL", "http://127.0.0.1:6379"),
        ("TALLY_LOG_LEVEL", "debug"),
        ("TALLY_LOG_LEVEL", "TRACE"),
        ("TALLY_PROCESSING_GUARANTEE", "exactly-once"),
        ("TALLY_WEB_PORT", "70000"),
        ("TALLY_WEB_HOST", "a host"),
        ("TALLY_WEB_ADVERTISED_HOST", "http://worker-1"),
        ("TALLY_TOPIC_PREFIX", "bad prefix"),
        ("TALLY_KAFKA_BOOTSTRAP", ""),
        ("TALLY_INGRESS_BODY_TIMEOUT_MS", "99"),
        ("TALLY_INGRESS_BODY_TIMEOUT_MS", "600001"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load({name: value})
    assert name in str(info.value)


def test_redacted_masks_passwords() -> None:
    got = load(
        {
            "TALLY_PG_DSN": "postgresql://tally:s3cret@db:5432/tally",
            "TALLY_REDIS_URL": "redis://:hunter2@cache:6379/0",
        }
    ).redacted()
    assert got["pg_dsn"] == "postgresql://tally:***@db:5432/tally"
    assert got["redis_url"] == "redis://:***@cache:6379/0"
    assert "s3cret" not in repr(got) and "hunter2" not in repr(got)
    assert got["partitions"] == 8


def test_redacted_leaves_passwordless_dsns_alone() -> None:
    got = Settings().redacted()
    assert got["pg_dsn"] == "postgresql://postgres@127.0.0.1:5432/tally"
    assert got["redis_url"] == "redis://127.0.0.1:6379/0"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(extra)
    return env


def test_cli_config_with_bad_partitions_exits_2_with_one_line() -> None:
    proc = subprocess.run(
        [str(TALLY), "config"],
        env=_env(TALLY_PARTITIONS="abc"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "TALLY_PARTITIONS" in lines[0]
    assert proc.stdout == ""


def test_cli_config_prints_redacted_settings() -> None:
    proc = subprocess.run(
        [str(TALLY), "config"],
        env=_env(
            TALLY_PG_DSN="postgresql://u:pw123@db/x",
            TALLY_REDIS_URL="redis://:rd456@cache:6379/0",
            TALLY_INGRESS_KEYS="client-a:key-secret-0123456789",
            TALLY_PARTITIONS="12",
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    # Printed, with the secret masked: not left out (that would hide the DSN in use).
    assert printed["pg_dsn"] == "postgresql://u:***@db/x", printed
    assert printed["redis_url"] == "redis://:***@cache:6379/0", printed
    assert printed["ingress_keys"] == "client-a:***", printed
    for secret in ("pw123", "rd456", "key-secret-0123456789"):
        assert secret not in proc.stdout and secret not in proc.stderr, secret
    assert printed["partitions"] == 12


def test_to_env_reads_back_into_the_same_settings() -> None:
    changed = msgspec.structs.replace(
        load({}), topic_prefix="x-1", partitions=3, web_port=7000, log_level="WARNING"
    )
    assert load(to_env(changed)) == changed
    assert to_env(changed)["TALLY_PARTITIONS"] == "3"


def test_the_advertised_web_host_defaults_to_the_listen_host_and_auto_resolves() -> None:
    import ipaddress

    from streams.worker import advertised_host

    assert advertised_host(load({})) == "127.0.0.1"
    both = {"TALLY_WEB_HOST": "0.0.0.0", "TALLY_WEB_ADVERTISED_HOST": "worker-1"}
    assert advertised_host(load(both)) == "worker-1"
    ipaddress.ip_address(advertised_host(load({"TALLY_WEB_ADVERTISED_HOST": "auto"})))


def test_the_body_timeout_is_read_in_milliseconds() -> None:
    assert Settings().ingress_body_timeout_ms == 10_000
    assert load({"TALLY_INGRESS_BODY_TIMEOUT_MS": "250"}).ingress_body_timeout_ms == 250
