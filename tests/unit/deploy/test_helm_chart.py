"""The Helm chart renders (`helm template`, helm built by scripts/helm.sh) and every
object validates against the Kubernetes schemas (kubernetes-validate, offline), for
the default values and a scaled deployment; and the rendered objects keep the promises
the README makes: a volume per engine worker, probes on every process's endpoints, the
secrets in a Secret, disruption budgets, the engine's web port cluster-internal."""

from __future__ import annotations

import copy
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "deploy" / "helm" / "tally"
KUBERNETES = "1.30.0"
VALUES = {"default": [], "scaled": ["-f", str(CHART / "ci" / "scaled-values.yaml")]}


@cache
def helm() -> str:
    built = subprocess.run(
        [str(ROOT / "scripts" / "helm.sh")], capture_output=True, text=True, timeout=1000
    )
    assert built.returncode == 0, f"scripts/helm.sh could not provide helm:\n{built.stderr}"
    return built.stdout.strip().splitlines()[-1]


@cache
def _rendered(name: str) -> str:
    done = subprocess.run(
        [helm(), "template", "t", str(CHART), *VALUES[name]],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def render(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_rendered(name)) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["metadata"]["name"], c)
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


@pytest.mark.parametrize("values", sorted(VALUES))
def test_chart_renders_objects_the_kubernetes_schemas_accept(values: str) -> None:
    docs = render(values)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ConfigMap", "Secret", "Service", "Service", "StatefulSet", "Deployment",
         "Deployment", "Deployment", "Job", "PodDisruptionBudget", "PodDisruptionBudget",
         "NetworkPolicy"]
    )  # fmt: skip
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_validation_refuses_a_broken_object() -> None:
    """The check can fail: an unknown field and a wrong type are refused."""
    sts = of_kind(render("default"), "StatefulSet")[0]
    for path, value in ((("spec", "replicaz"), 3), (("spec", "replicas"), "three")):
        broken = copy.deepcopy(sts)
        broken[path[0]][path[1]] = value
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_scaled_values_scale_every_part() -> None:
    docs = render("scaled")
    replicas = {
        d["metadata"]["name"]: d["spec"]["replicas"]
        for d in docs
        if "replicas" in d.get("spec", {})
    }
    assert replicas == {
        "t-tally-engine": 8, "t-tally-ingress": 4,
        "t-tally-sink-postgres": 3, "t-tally-sink-redis": 2,
    }  # fmt: skip
    settings = of_kind(docs, "ConfigMap")[0]["data"]
    assert settings["TALLY_PARTITIONS"] == "32"
    sts = of_kind(docs, "StatefulSet")[0]
    claim = sts["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["storageClassName"] == "fast-ssd"


@pytest.mark.parametrize("values", sorted(VALUES))
def test_every_process_has_probes_on_its_endpoints_and_resource_requests(values: str) -> None:
    for name, container in containers(render(values)):
        assert container["resources"]["requests"], name
        if name.endswith("-migrate"):
            continue
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez", name
        port = container["readinessProbe"]["httpGet"]["port"]
        assert port in {p["name"] for p in container["ports"]}, name


def test_engine_workers_are_a_statefulset_with_a_volume_each() -> None:
    sts = of_kind(render("default"), "StatefulSet")[0]
    spec = sts["spec"]
    assert spec["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = spec["template"]["spec"]["containers"][0]["volumeMounts"]
    assert mounts == [{"name": "state", "mountPath": "/var/lib/tally"}]
    settings = of_kind(render("default"), "ConfigMap")[0]["data"]
    assert settings["TALLY_DATA_DIR"].startswith("/var/lib/tally/")


def test_secrets_are_in_the_secret_not_the_settings() -> None:
    docs = render("scaled")
    secret = of_kind(docs, "Secret")[0]["stringData"]
    assert set(secret) == {"TALLY_PG_DSN", "TALLY_REDIS_URL", "TALLY_INGRESS_KEYS"}
    assert "client-a:" in secret["TALLY_INGRESS_KEYS"]
    settings = of_kind(docs, "ConfigMap")[0]["data"]
    assert not set(settings) & set(secret)
    for _, container in containers(docs):
        refs = [next(iter(r.values()))["name"] for r in container["envFrom"]]
        assert refs == ["t-tally-settings", "t-tally-secrets"]


def test_migrations_run_as_a_hook_job_and_budgets_cover_engine_and_ingress() -> None:
    docs = render("default")
    job = of_kind(docs, "Job")[0]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
    covered = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        for d in of_kind(docs, "PodDisruptionBudget")
    }
    assert covered == {"engine", "ingress"}


def test_engine_web_port_admits_only_ingress_workers_and_the_scraper() -> None:
    docs = render("default")
    (policy,) = of_kind(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    sources = rule["from"]
    components = {
        s["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
        for s in sources
        if "namespaceSelector" not in s
    }
    assert components == {"ingress", "engine"}
    scrapers = [s for s in sources if "namespaceSelector" in s]
    assert len(scrapers) == 1 and scrapers[0]["podSelector"]["matchLabels"]
    assert rule["ports"] == [{"port": "web", "protocol": "TCP"}]
    # The workers' Service is headless and internal: no LoadBalancer or NodePort.
    services = of_kind(docs, "Service")
    engine_service = [s for s in services if s["metadata"]["name"] == "t-tally-engine"]
    assert engine_service[0]["spec"]["clusterIP"] == "None"
    assert "type" not in engine_service[0]["spec"]
