"""docker-compose.yml cannot be run here (no Docker engine), so what can be checked
without one is: the app services' settings are valid Tally settings, they reach the
broker on the listener it advertises to containers, and the worker can be scaled."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from core.settings import Settings, load

ROOT = Path(__file__).resolve().parents[3]
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


def test_monitoring_profile_mounts_the_rules_and_dashboard_and_scrapes_every_process() -> None:
    services = _compose()
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            host = volume.split(":")[0]
            assert (ROOT / host).is_dir(), volume
    config = yaml.safe_load((ROOT / "deploy/monitoring/prometheus/prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert (ROOT / "deploy/monitoring/prometheus/alerts.yml").exists()
    targets = {
        t
        for job in config["scrape_configs"]
        for c in job.get("static_configs", [])
        for t in c["targets"]
    }
    defaults = Settings()
    assert targets == {
        f"ingress:{defaults.ingress_port}",
        f"sink-postgres:{defaults.sink_postgres_web_port}",
        f"sink-redis:{defaults.sink_redis_web_port}",
    }
    (engine,) = [j for j in config["scrape_configs"] if j["job_name"] == "tally-engine"]
    assert engine["dns_sd_configs"][0]["port"] == defaults.web_port
