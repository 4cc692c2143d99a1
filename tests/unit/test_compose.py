"""docker-compose.yml cannot be run here (no Docker engine), so what can be checked
without one is: the app services' settings are valid Tally settings, they reach the
broker on the listener it advertises to containers, and the worker can be scaled."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tally.settings import load

ROOT = Path(__file__).resolve().parents[2]
APP = ("worker", "sink-postgres", "sink-redis", "ingress")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data["services"]


def _defaults(value: str) -> str:
    """Compose's `${NAME:-default}` as the default (the file's own fallback)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_app_services_are_behind_a_profile_so_services_sh_starts_only_the_stores() -> None:
    services = _compose()
    assert all(services[name].get("profiles") == ["app"] for name in APP)
    assert all("profiles" not in services[name] for name in ("kafka", "postgres", "redis"))


def test_app_settings_are_valid_and_use_the_containers_listener() -> None:
    services = _compose()
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for name in APP:
        env = {k: _defaults(str(v)) for k, v in services[name]["environment"].items()}
        if name == "ingress":
            env["TALLY_INGRESS_KEYS"] = "client-1:0123456789abcdef"
        settings = load(env)  # raises on an unknown or bad TALLY_* variable
        assert f"DOCKER://{settings.kafka_bootstrap}" in advertised, name


def test_the_worker_scales_it_publishes_no_fixed_port_and_advertises_its_own_address() -> None:
    worker = _compose()["worker"]
    assert "ports" not in worker and "container_name" not in worker
    assert worker["environment"]["TALLY_WEB_ADVERTISED_HOST"] == "auto"
    assert worker["environment"]["TALLY_WEB_HOST"] == "0.0.0.0"
    assert "6066/readyz" in " ".join(worker["healthcheck"]["test"])
