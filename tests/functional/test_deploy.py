"""The deploy/ artefacts, validated offline (no Docker engine, no cluster).

- Prometheus: promtool checks the scrape configs and the rules and runs the
  rule unit tests; every metric an alert names is exported by a live sidecar.
- Kubernetes: kustomize (or `kubectl kustomize`) builds the base and the
  example overlay; a structural check in Python runs with or without it
  (every referenced file exists, objects are well formed, containers have
  probes, resources and a locked-down securityContext, images are pinned).
- The policies ConfigMap holds byte-identical copies of policies/, and the
  sidecar.yaml of the config ConfigMap passes `goproxy-sidecar check` against
  them, laid out the way the kubelet mounts a ConfigMap.
- components/front-door renders its Secrets, mounts, HTTPS probes (their
  endpoints pinned open) and Service, refuses to start on its placeholders,
  and its container serves and rotates Secrets on loopback
  (test_deploy_scrape.py: Prometheus scraping it through the door).
- The Containerfile follows the basic rules (multi-stage, non-root USER,
  HEALTHCHECK, pinned bases) and its HEALTHCHECK command works, over HTTPS
  too (test_deploy_health.py: the `goproxy-sidecar health` command itself).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from tests.certs import self_signed, self_signed_pem
from tests.functional.test_cli import free_port
from tests.tools import find_tool, require_tool

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
KUBERNETES = DEPLOY / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
CONTAINERFILE = DEPLOY / "Containerfile"
# Where prometheus-kubernetes.yml reads the goproxy-sidecar-scrape Secret.
SCRAPE_SECRET_DIR = "/etc/prometheus/secrets/goproxy-sidecar-scrape"

SIDECAR_PORT = 3001
ATHENS_PORT = 3000
CONFIG_MOUNT = "/etc/goproxy-sidecar/sidecar.yaml"
POLICIES_MOUNT = "/etc/goproxy-sidecar/policies"
CACHE_MOUNT = "/var/cache/goproxy-sidecar"
METRIC = re.compile(r"\bgoproxy_sidecar_[a-z0-9_]+")


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(PROMETHEUS / "alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


# ====================================================================== Prometheus


def test_promtool_checks_the_local_scrape_config() -> None:
    promtool = require_tool("promtool")
    out = run([str(promtool), "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def scrape_secret_files(folder: Path, ca: bytes, token: str) -> Path:
    """The goproxy-sidecar-scrape Secret as a folder Prometheus reads."""
    folder.mkdir(parents=True)
    (folder / "ca.crt").write_bytes(ca)
    (folder / "token").write_text(token + "\n")
    return folder


def test_promtool_checks_the_kubernetes_scrape_config(tmp_path: Path) -> None:
    """promtool insists that the scrape Secret's files exist: they are laid
    out under tmp_path. Debian's promtool is built without Kubernetes
    discovery: then everything but the discovery block (relabelling,
    regexes, TLS and authorization, rule files) is checked by promtool on a
    copy with static targets, and the block itself here."""
    promtool = require_tool("promtool")
    text = (PROMETHEUS / "prometheus-kubernetes.yml").read_text()
    assert SCRAPE_SECRET_DIR in text
    pair = tmp_path / "pair"
    pair.mkdir()
    cert, _ = self_signed(pair)
    secrets = scrape_secret_files(tmp_path / "secrets", cert.read_bytes(), "a-token")
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace(SCRAPE_SECRET_DIR, str(secrets)))
    (tmp_path / "alerts.yml").write_bytes((PROMETHEUS / "alerts.yml").read_bytes())
    out = run([str(promtool), "check", "config", str(config)])
    if out.returncode == 0:
        return
    assert "kubernetes_sd_configs" in out.stdout + out.stderr, out.stdout + out.stderr
    doc = yaml.safe_load(config.read_text())
    for job in doc["scrape_configs"]:
        for sd in job.pop("kubernetes_sd_configs", []):
            assert sd["role"] == "pod", job["job_name"]
            job["static_configs"] = [{"targets": ["10.0.0.1:3001"]}]
    config.write_text(yaml.safe_dump(doc))
    out = run([str(promtool), "check", "config", str(config)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_checks_the_alert_rules() -> None:
    promtool = require_tool("promtool")
    out = run([str(promtool), "check", "rules", str(PROMETHEUS / "alerts.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    promtool = require_tool("promtool")
    out = run([str(promtool), "test", "rules", str(PROMETHEUS / "alerts_test.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_unit_tests_cover_load_shedding_and_breaker_open() -> None:
    tested = {
        case["alertname"]
        for test in load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {"GoproxySidecarLoadShedding", "GoproxySidecarBreakerOpen"} <= tested
    assert tested <= {rule["alert"] for rule in alert_rules()}


def test_every_alert_tells_on_call_what_and_where_to_look() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        notes = rule["annotations"]
        assert notes["summary"] and len(notes["description"]) > 80, name
        assert "/breakers" in notes["runbook"], name
    # The load-shedding alert is the policy's own "alert": it must not wait.
    shedding = rules["GoproxySidecarLoadShedding"]
    assert "goproxy_sidecar_breaker_alert" in shedding["expr"]
    assert shedding.get("for", "0s") in ("0s", "0m", "15s", "30s")
    for name in (
        "GoproxySidecarBreakerOpen",
        "GoproxySidecarPolicyStale",
        "GoproxySidecarPolicyReloadFailed",
        "GoproxySidecarCacheWriteErrors",
        "GoproxySidecarCacheIntegrityFailures",
        "GoproxySidecarUpstreamErrorRateHigh",
        "GoproxySidecarAllUpstreamsUnavailable",
    ):
        assert name in rules
    assert 'reason="no_target"' in rules["GoproxySidecarAllUpstreamsUnavailable"]["expr"]


def test_rate_and_increase_are_only_taken_of_counters() -> None:
    for rule in alert_rules():
        for name in re.findall(r"(?:rate|increase)\(\s*(goproxy_sidecar_[a-z0-9_]+)", rule["expr"]):
            assert name.endswith("_total"), (rule["alert"], name)


def exported_names(text: str) -> set[str]:
    """Every series name the exposition can produce, with or without samples yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


async def test_alerts_use_only_metrics_a_live_sidecar_exports(
    fake_upstreams: Callable[..., Any], sidecar_client: Callable[..., Any]
) -> None:
    [(_, url)] = await fake_upstreams(1)
    client, _ = await sidecar_client([url])
    resp = await client.get("/example.com/mod/@v/list")  # the fake answers 404
    assert resp.status == 404
    resp = await client.get("/metrics")
    assert resp.status == 200
    exported = exported_names(await resp.text())

    used = {name for rule in alert_rules() for name in METRIC.findall(rule["expr"])}
    tested = set(METRIC.findall((PROMETHEUS / "alerts_test.yml").read_text()))
    assert used, "no goproxy_sidecar_ metric in alerts.yml?"
    assert used - exported == set(), f"alerts.yml names unknown metrics: {used - exported}"
    assert tested - exported == set(), f"alerts_test.yml: unknown metrics {tested - exported}"


def relabel(target: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' keep/replace relabelling, enough for the example job."""
    labels = dict(target)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if not match:
                return None
        elif match:
            replacement = re.sub(r"\$(\d+)", r"\\\1", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(replacement)
    return labels


def discovered(pod_ip: str, annotations: dict[str, str]) -> dict[str, str]:
    """A target as Kubernetes pod discovery yields it (the Athens port)."""
    target = {
        "__address__": f"{pod_ip}:3000" if ":" not in pod_ip else f"[{pod_ip}]:3000",
        "__meta_kubernetes_pod_ip": pod_ip,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_namespace": "goproxy",
        "__meta_kubernetes_pod_name": "goproxy-abc",
        "__metrics_path__": "/metrics",
    }
    for key, value in annotations.items():
        target["__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
    return target


def pod_jobs() -> dict[str, dict[str, Any]]:
    doc = load_yaml(PROMETHEUS / "prometheus-kubernetes.yml")
    return {job["job_name"]: job for job in doc["scrape_configs"]}


@pytest.mark.parametrize(
    "pod_ip, address", [("10.1.2.3", "10.1.2.3:3001"), ("fd00:10::17", "[fd00:10::17]:3001")]
)
def test_pod_discovery_scrapes_the_annotated_sidecar_port(pod_ip: str, address: str) -> None:
    jobs = pod_jobs()
    assert sorted(jobs) == ["goproxy-sidecar-pods", "goproxy-sidecar-pods-https"]
    annotations = pod_template(rendered_or_raw(BASE))["metadata"]["annotations"]
    target = discovered(pod_ip, annotations)
    labels = relabel(target, jobs["goproxy-sidecar-pods"]["relabel_configs"])
    assert labels is not None
    assert labels["__address__"] == address
    assert labels["__metrics_path__"] == "/metrics"
    assert labels["pod"] == "goproxy-abc" and labels["namespace"] == "goproxy"
    assert jobs["goproxy-sidecar-pods"].get("scheme", "http") == "http"
    # A plain pod is not the HTTPS job's (it would send the token to it).
    assert relabel(target, jobs["goproxy-sidecar-pods-https"]["relabel_configs"]) is None
    target["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] = "false"
    assert relabel(target, jobs["goproxy-sidecar-pods"]["relabel_configs"]) is None


# ====================================================================== Grafana

DASHBOARD = DEPLOY / "grafana" / "goproxy-sidecar.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that draws something (rows are layout only), nested rows included."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def registry_names() -> set[str]:
    """Every series name sidecar/metrics.py's registry can export."""
    from sidecar.metrics import Metrics

    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def test_the_grafana_dashboard_imports_and_names_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"DS_PROMETHEUS", "instance", "upstream"} <= variables
    panels = dashboard_panels(dashboard)
    nested = [q for p in dashboard["panels"] for q in p.get("panels", [])]
    ids = [p["id"] for p in dashboard["panels"] + nested]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exported = registry_names()
    used: set[str] = set()
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"], f"{title}: no target"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            names = set(METRIC.findall(target["expr"]))
            assert names, f"{title}: {target['expr']} names no sidecar metric"
            assert names <= exported, f"{title}: unknown metrics {names - exported}"
            for name in re.findall(r"(?:rate|increase)\(\s*(goproxy_sidecar_\w+)", target["expr"]):
                assert name.endswith(("_total", "_bucket")), (title, name)
            used |= names
    kinds = {p["type"] for p in panels}
    assert {"state-timeline", "gauge"} <= kinds
    for needed in (
        "goproxy_sidecar_breaker_state",
        "goproxy_sidecar_upstream_ttfb_p99_seconds",
        "goproxy_sidecar_request_duration_seconds_bucket",
        "goproxy_sidecar_upstream_error_rate",
        "goproxy_sidecar_masked_failures_total",
        "goproxy_sidecar_upstream_queue_wait_seconds_bucket",
        "goproxy_sidecar_upstream_overflows_total",
        "goproxy_sidecar_hedges_total",
        "goproxy_sidecar_rejected_requests_total",
        "goproxy_sidecar_integrity_failures_total",
        "goproxy_sidecar_cache_hits_total",
        "goproxy_sidecar_cache_bytes",
        "goproxy_sidecar_policy_evaluations_total",
        "goproxy_sidecar_policy_failures_total",
        "goproxy_sidecar_policy_evaluation_duration_seconds_bucket",
        "goproxy_sidecar_policy_reloads_total",
    ):
        assert needed in used, f"the dashboard does not show {needed}"


# ====================================================================== Kubernetes


def kustomize_command() -> list[str]:
    kustomize = find_tool("kustomize")
    if kustomize is not None:
        return [str(kustomize), "build"]
    kubectl = find_tool("kubectl")
    if kubectl is not None:
        return [str(kubectl), "kustomize"]
    return [str(require_tool("kustomize")), "build"]


def kustomize_build(root: Path) -> list[dict[str, Any]]:
    out = run([*kustomize_command(), str(root)])
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def rendered_or_raw(root: Path) -> list[dict[str, Any]]:
    """The kustomize output when a kustomize is at hand, else the raw objects."""
    if find_tool("kustomize") or find_tool("kubectl"):
        return kustomize_build(root)
    return load_tree(root).objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_template(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [deployment] = by_kind(objects, "Deployment")
    template: dict[str, Any] = deployment["spec"]["template"]
    return template


def containers(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod_template(objects)["spec"]["containers"]}


def config_map(objects: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    [found] = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].startswith(prefix)]
    return found


class Tree:
    """What a kustomization references, read the way kustomize would (no merging)."""

    def __init__(self) -> None:
        self.objects: list[dict[str, Any]] = []
        self.patches: list[dict[str, Any]] = []
        self.generated: dict[str, dict[str, Path]] = {}  # ConfigMap name -> key -> file


def load_tree(root: Path, tree: Tree | None = None, kind: str = "Kustomization") -> Tree:
    tree = tree if tree is not None else Tree()
    doc = load_yaml(root / "kustomization.yaml")
    assert doc.get("kind", "Kustomization") == kind, root
    for entry in doc.get("resources", []) + doc.get("components", []):
        path = (root / entry).resolve()
        if path.is_dir():
            sub = load_yaml(path / "kustomization.yaml")
            load_tree(path, tree, sub.get("kind", "Kustomization"))
        else:
            tree.objects += [o for o in yaml.safe_load_all(inside(root, path).read_text()) if o]
    for patch in doc.get("patches", []):
        text = (
            inside(root, (root / patch["path"]).resolve()).read_text()
            if "path" in patch
            else patch["patch"]
        )
        for obj in yaml.safe_load_all(text):
            if isinstance(obj, dict):
                tree.patches.append(obj)
    for generator in doc.get("configMapGenerator", []):
        files = {}
        for entry in generator.get("files", []):
            key, _, source = entry.rpartition("=")
            path = inside(root, (root / source).resolve())
            files[key or path.name] = path
        tree.generated[generator["name"]] = files
    return tree


def inside(root: Path, path: Path) -> Path:
    """kustomize's default load restrictor: files only in or below the root."""
    assert path.is_relative_to(root.resolve()), f"{path} is outside {root}"
    assert path.is_file(), f"{path} (referenced by {root}/kustomization.yaml) is missing"
    return path


@pytest.mark.parametrize("root", [BASE, OVERLAY], ids=["base", "overlay"])
def test_kustomize_tree_is_complete_and_well_formed(root: Path) -> None:
    """Runs without any tool: the structural half of `kustomize build`."""
    tree = load_tree(root)
    for obj in tree.objects + tree.patches:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
    known = {(o["kind"], o["metadata"]["name"]) for o in tree.objects}
    for patch in tree.patches:
        assert (patch["kind"], patch["metadata"]["name"]) in known, patch["metadata"]
    volumes = pod_template(tree.objects)["spec"]["volumes"]
    for volume in volumes:
        if "configMap" in volume:
            assert volume["configMap"]["name"] in tree.generated, volume
    policies = tree.generated["goproxy-sidecar-policies"]
    assert sorted(policies) == ["breaker.rego", "thresholds.yaml"]
    patched = [
        c
        for p in tree.patches
        for c in p.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        if "image" in c
    ]
    for container in pod_template(tree.objects)["spec"]["containers"] + patched:
        check_container(container, pod_template(tree.objects)["spec"])


def check_container(container: dict[str, Any], pod: dict[str, Any]) -> None:
    name = container["name"]
    image = container["image"]
    tag = image.rsplit("/", 1)[-1]
    assert "@sha256:" in image or (":" in tag and not tag.endswith(":latest")), (name, image)
    assert container.get("livenessProbe"), f"{name}: no liveness probe"
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) >= {"cpu", "memory"}, (name, kind)
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True, name
    assert sc["allowPrivilegeEscalation"] is False, name
    assert sc["capabilities"]["drop"] == ["ALL"], name
    assert sc.get("runAsNonRoot", pod["securityContext"].get("runAsNonRoot")) is True, name
    assert sc.get("runAsUser", 1) != 0, name
    seccomp = sc.get("seccompProfile") or pod["securityContext"]["seccompProfile"]
    assert seccomp["type"] == "RuntimeDefault", name


def test_kustomize_builds_the_base() -> None:
    objects = kustomize_build(BASE)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "ConfigMap", "Deployment", "Service"]
    template = pod_template(objects)
    assert sorted(containers(objects)) == ["athens", "sidecar"]
    for container in template["spec"]["containers"]:
        check_container(container, template["spec"])
    # The config ConfigMap carries a content hash (a change rolls the pods),
    # the policies one does not (a change is reloaded in place).
    assert re.fullmatch(
        r"goproxy-sidecar-config-[a-z0-9]{10}",
        config_map(objects, "goproxy-sidecar-config")["metadata"]["name"],
    )
    assert (
        config_map(objects, "goproxy-sidecar-policies")["metadata"]["name"]
        == "goproxy-sidecar-policies"
    )


def test_kustomize_builds_the_example_overlay() -> None:
    objects = kustomize_build(OVERLAY)
    kinds = {o["kind"] for o in objects}
    assert kinds == {"Namespace", "ConfigMap", "Deployment", "Service", "PodMonitor"}
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "goproxy", obj["metadata"]
    [deployment] = by_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    found = containers(objects)
    assert sorted(found) == ["athens", "opa", "sidecar"]
    template = pod_template(objects)
    for container in template["spec"]["containers"]:
        check_container(container, template["spec"])
    env = {e["name"]: e.get("value") for e in found["sidecar"]["env"]}
    assert env["SIDECAR_POLICY_ENGINE"] == "opa"
    opa = found["opa"]
    assert opa["image"] == "openpolicyagent/opa:1.22.2"
    assert opa["args"][:2] == ["run", "--server"]
    assert "--addr=127.0.0.1:8181" in opa["args"] and "--ignore=.*" in opa["args"]
    [mount] = opa["volumeMounts"]
    assert mount["name"] == "policies" and opa["args"][-1] == mount["mountPath"]
    # PodMonitor instead of the annotations, never both.
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "false"
    [monitor] = by_kind(objects, "PodMonitor")
    labels = template["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for c in found.values() for p in c.get("ports", [])}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def test_the_pod_is_wired_the_way_the_sidecar_config_says() -> None:
    objects = rendered_or_raw(BASE)
    config = sidecar_config(objects)
    found = containers(objects)
    sidecar, athens = found["sidecar"], found["athens"]
    assert int(config["listen"].rsplit(":", 1)[1]) == port_number(sidecar, "http") == SIDECAR_PORT
    assert config["listen"].startswith("0.0.0.0:")  # probes and the Service use the pod IP
    assert config["upstreams"][0]["url"] == f"http://127.0.0.1:{ATHENS_PORT}"
    assert config["upstreams"][1]["url"] == "https://proxy.golang.org"
    assert port_number(athens, "athens") == ATHENS_PORT
    athens_env = {e["name"]: e["value"] for e in athens["env"]}
    assert athens_env["ATHENS_PORT"] == f":{ATHENS_PORT}"
    assert athens_env["ATHENS_STORAGE_TYPE"] == "disk"
    athens_mounts = {m["mountPath"] for m in athens["volumeMounts"]}
    assert athens_env["ATHENS_DISK_STORAGE_ROOT"] in athens_mounts

    probe = sidecar["readinessProbe"]["httpGet"]
    assert probe["path"] == "/readyz" and port_number(sidecar, probe["port"]) == SIDECAR_PORT
    probe = sidecar["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and port_number(sidecar, probe["port"]) == SIDECAR_PORT
    probe = athens["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and port_number(athens, probe["port"]) == ATHENS_PORT
    assert "readinessProbe" not in athens  # Athens being sick must not unready the pod

    assert sidecar["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "384Mi"},
    }
    assert sidecar["securityContext"]["runAsUser"] == 10001

    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_template(objects)["spec"]["volumes"]}
    assert mounts[CONFIG_MOUNT]["subPath"] == "sidecar.yaml"
    assert "subPath" not in mounts[POLICIES_MOUNT]  # subPath mounts never see updates
    assert config["policy"]["paths"] == [POLICIES_MOUNT]
    assert config["cache"]["dir"] == CACHE_MOUNT
    cache_volume = volumes[mounts[CACHE_MOUNT]["name"]]["emptyDir"]
    assert parse_quantity(cache_volume["sizeLimit"]) > parse_quantity(config["cache"]["max_bytes"])

    template = pod_template(objects)
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(SIDECAR_PORT)
    assert template["spec"]["enableServiceLinks"] is False  # SIDECAR_* would be config
    [service] = by_kind(objects, "Service")
    assert service["metadata"]["name"] == "goproxy"
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    [port] = service["spec"]["ports"]
    assert port_number(sidecar, port["targetPort"]) == SIDECAR_PORT


def parse_quantity(text: str) -> int:
    """Kubernetes quantities and sidecar sizes alike: 10Gi, 10GiB, 8GiB."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)B?", text)
    assert match, text
    return int(match.group(1)) * units[match.group(2)]


def sidecar_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    cm = [
        o
        for o in by_kind(objects, "ConfigMap")
        if o["metadata"]["name"].startswith("goproxy-sidecar-config")
    ]
    if cm:  # rendered
        loaded: dict[str, Any] = yaml.safe_load(cm[0]["data"]["sidecar.yaml"])
        return loaded
    loaded = load_yaml(BASE / "sidecar.yaml")
    return loaded


def test_the_image_default_config_is_the_kubernetes_one() -> None:
    """The Containerfile ships base/sidecar.yaml; its EXPOSE names that port."""
    assert "deploy/kubernetes/base/sidecar.yaml" in CONTAINERFILE.read_text()
    assert load_yaml(BASE / "sidecar.yaml")["listen"] == f"0.0.0.0:{SIDECAR_PORT}"


# ====================================================================== policies


def policy_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith("_test.rego") and "__pycache__" not in p.parts
    }


def test_policies_copy_is_byte_identical_to_policies() -> None:
    source = policy_files(REPO / "policies")
    copy = policy_files(BASE / "policies")
    assert sorted(source) == sorted(copy) == ["sidecar/breaker.rego", "thresholds.yaml"], (
        "deploy/kubernetes/base/policies must mirror policies/ (without *_test.rego)"
    )
    for name in source:
        assert copy[name] == source[name], (
            f"deploy/kubernetes/base/policies/{name} differs from policies/{name}: "
            f"cp policies/{name} deploy/kubernetes/base/policies/{name}"
        )


def configmap_volume(tmp: Path, files: dict[str, bytes]) -> Path:
    """A folder laid out as the kubelet mounts a ConfigMap: the keys are
    symlinks into ..data, itself a symlink to a timestamped folder."""
    stamp = tmp / "..2025_01_01_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for key, data in files.items():
        (stamp / key).write_bytes(data)
    (tmp / "..data").symlink_to(stamp.name)
    for key in files:
        (tmp / key).symlink_to(f"..data/{key}")
    return tmp


def configmap_files(objects: list[dict[str, Any]], prefix: str) -> dict[str, bytes]:
    cm = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].startswith(prefix)]
    if cm:
        return {k: v.encode() for k, v in cm[0]["data"].items()}
    files = load_tree(BASE).generated[prefix]
    return {key: path.read_bytes() for key, path in files.items()}


def clean_env() -> dict[str, str]:
    """No stray SIDECAR_* overrides; the package importable from any folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def test_the_configmap_sidecar_yaml_passes_check(tmp_path: Path) -> None:
    objects = rendered_or_raw(BASE)
    config_dir = configmap_volume(
        tmp_path / "config", configmap_files(objects, "goproxy-sidecar-config")
    )
    policies = configmap_volume(
        tmp_path / "policies", configmap_files(objects, "goproxy-sidecar-policies")
    )
    env = clean_env()
    # The pod mounts the policies at /etc/goproxy-sidecar/policies; here they
    # are somewhere else, so point policy.paths at them the way an operator would.
    env["SIDECAR_POLICY_PATHS"] = str(policies)
    out = run(
        [sys.executable, "-m", "sidecar", "check", "--config", str(config_dir / "sidecar.yaml")],
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "config ok" in out.stdout
    # The kubelet's ..data copies are skipped: each file is loaded once.
    loaded = re.search(r"(\d+) file\(s\)", out.stdout)
    assert loaded is None or loaded.group(1) == "2", out.stdout


def test_check_without_the_override_only_misses_the_mounted_policies(tmp_path: Path) -> None:
    out = run(
        [sys.executable, "-m", "sidecar", "check", "--config", str(BASE / "sidecar.yaml")],
        env=clean_env(),
        cwd=tmp_path,
    )
    if out.returncode == 0:  # running inside the image, where the policies exist
        return
    assert POLICIES_MOUNT in out.stderr and "invalid config" not in out.stderr, out.stderr


# ====================================================================== front door

FRONT_DOOR = KUBERNETES / "components" / "front-door"
CLIENT_AUTH_SECRET = "goproxy-sidecar-client-auth"
TLS_SECRET = "goproxy-sidecar-tls"
SCRAPE_SECRET = "goproxy-sidecar-scrape"
# The PodMonitor's and the HTTPS job's serverName: what the certificate names.
SERVICE_NAME = "goproxy.goproxy.svc.cluster.local"
SCRAPE_TOKEN = "prometheus-scrape-token-0123456789"
PASSWORDS = {"alice": "alice-Pa55word", "bob": "bob-Pa55word", "carol": "carol-Pa55word"}


def front_door_overlay(
    tmp: Path, replacements: dict[str, dict[str, bytes]], before: tuple[Path, ...] = ()
) -> Path:
    """An operator's overlay: the base with the front door (after the
    components ``before``), its placeholder Secrets replaced by a component
    of the operator's own listed after it, as the README says (an overlay's
    own secretGenerator runs before components, so it cannot replace them)."""
    root = tmp / "overlay"
    own = root / "front-door-secrets"
    own.mkdir(parents=True)
    generators = []
    for name, files in replacements.items():
        for key, data in files.items():
            (own / key).write_bytes(data)
        generator: dict[str, Any] = {
            "name": name,
            "behavior": "replace",
            "files": [f"{key}={key}" for key in files],
            "options": {"disableNameSuffixHash": True},
        }
        if name == TLS_SECRET:
            generator["type"] = "kubernetes.io/tls"
        generators.append(generator)
    components = [os.path.relpath(path, root) for path in (*before, FRONT_DOOR)]
    if generators:
        (own / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1alpha1",
                    "kind": "Component",
                    "secretGenerator": generators,
                }
            )
        )
        components.append("front-door-secrets")
    (root / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(BASE, root)],
                "components": components,
            }
        )
    )
    return root


def secret_files(objects: list[dict[str, Any]], name: str) -> dict[str, bytes]:
    [secret] = [o for o in by_kind(objects, "Secret") if o["metadata"]["name"] == name]
    return {key: base64.b64decode(value) for key, value in secret["data"].items()}


def secret_mounts(objects: list[dict[str, Any]]) -> dict[str, str]:
    """Secret name -> where the sidecar container mounts it."""
    volumes = {
        v["name"]: v["secret"]["secretName"]
        for v in pod_template(objects)["spec"]["volumes"]
        if "secret" in v
    }
    return {
        volumes[m["name"]]: m["mountPath"]
        for m in containers(objects)["sidecar"]["volumeMounts"]
        if m["name"] in volumes
    }


def token_line(name: str, token: str) -> str:
    return f"{name} sha256:{hashlib.sha256(token.encode()).hexdigest()}\n"


def real_secrets(tmp: Path) -> dict[str, dict[str, bytes]]:
    """Throwaway credentials: htpasswd -B entries, tokens (one of them
    Prometheus'), a self-signed pair for the Service's names, and the scrape
    Secret (that token, and the certificate as its CA)."""
    tool = require_tool("htpasswd")
    users = tmp / "htpasswd"
    for flags, user in (("-cbB", "alice"), ("-bB", "bob")):
        subprocess.run(
            [str(tool), flags, str(users), user, PASSWORDS[user]], check=True, timeout=60
        )
    cert, key = self_signed_pem(
        "front-door", [x509.DNSName(SERVICE_NAME), x509.DNSName("goproxy.goproxy.svc")]
    )
    tokens = token_line("ci", "a-long-random-token") + token_line("prometheus", SCRAPE_TOKEN)
    return {
        CLIENT_AUTH_SECRET: {"htpasswd": users.read_bytes(), "tokens": tokens.encode()},
        TLS_SECRET: {"tls.crt": cert, "tls.key": key},
        SCRAPE_SECRET: {"token": SCRAPE_TOKEN.encode() + b"\n", "ca.crt": cert},
    }


def pod_env(objects: list[dict[str, Any]], tmp: Path) -> tuple[dict[str, str], Path]:
    """The sidecar container's environment and its config file, with every
    ConfigMap and Secret laid out the way the kubelet mounts them under
    ``tmp`` and the container's paths pointed there."""
    config_dir = configmap_volume(
        tmp / "config", configmap_files(objects, "goproxy-sidecar-config")
    )
    policies = configmap_volume(
        tmp / "policies", configmap_files(objects, "goproxy-sidecar-policies")
    )
    moved = {
        mount: configmap_volume(tmp / name, secret_files(objects, name))
        for name, mount in secret_mounts(objects).items()
    }
    env = clean_env()
    for variable in containers(objects)["sidecar"]["env"]:
        value = variable["value"]
        for mount, folder in moved.items():
            value = value.replace(mount + "/", f"{folder}/")
        env[variable["name"]] = value
    env["SIDECAR_POLICY_PATHS"] = str(policies)
    return env, config_dir / "sidecar.yaml"


def test_the_front_door_component_renders(tmp_path: Path) -> None:
    objects = kustomize_build(front_door_overlay(tmp_path, {}))
    assert sorted(o["kind"] for o in objects) == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "Secret",
        "Secret",
        "Secret",
        "Service",
    ]
    # No hash suffix: an update of the same Secret reaches the running pods.
    placeholders = {
        name: secret_files(objects, name)
        for name in (CLIENT_AUTH_SECRET, TLS_SECRET, SCRAPE_SECRET)
    }
    assert sorted(placeholders[CLIENT_AUTH_SECRET]) == ["htpasswd", "tokens"]
    assert sorted(placeholders[TLS_SECRET]) == ["tls.crt", "tls.key"]
    assert sorted(placeholders[SCRAPE_SECRET]) == ["ca.crt", "token"]
    [tls] = [o for o in by_kind(objects, "Secret") if o["metadata"]["name"] == TLS_SECRET]
    assert tls["type"] == "kubernetes.io/tls"
    for files in placeholders.values():
        for key, data in files.items():
            assert b"PRIVATE KEY" not in data and b"BEGIN" not in data, key

    template = pod_template(objects)
    for container in template["spec"]["containers"]:
        check_container(container, template["spec"])
    sidecar = containers(objects)["sidecar"]
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    where = secret_mounts(objects)
    assert sorted(where) == [CLIENT_AUTH_SECRET, TLS_SECRET]
    for mount in where.values():
        assert mounts[mount]["readOnly"] is True
        assert "subPath" not in mounts[mount]  # subPath mounts never see updates
    for volume in template["spec"]["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] == 0o440, volume

    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env["SIDECAR_CLIENT_AUTH_ENABLED"] == "true"
    mounted = {
        "SIDECAR_CLIENT_AUTH_HTPASSWD": (CLIENT_AUTH_SECRET, "htpasswd"),
        "SIDECAR_CLIENT_AUTH_TOKENS_FILE": (CLIENT_AUTH_SECRET, "tokens"),
        "SIDECAR_TLS_CERTIFICATE": (TLS_SECRET, "tls.crt"),
        "SIDECAR_TLS_KEY": (TLS_SECRET, "tls.key"),
    }
    for variable, (secret, key) in mounted.items():
        assert env[variable] == f"{where[secret]}/{key}", variable
    # The kubelet's probes need no credential: the endpoint rules stay at
    # their defaults (healthz and readyz open), and they speak HTTPS.
    # The probes' endpoints are pinned open (variables win over sidecar.yaml);
    # the other endpoint rules stay the config's.
    endpoints = {n: v for n, v in env.items() if n.startswith("SIDECAR_CLIENT_AUTH_ENDPOINTS")}
    assert endpoints == {
        "SIDECAR_CLIENT_AUTH_ENDPOINTS_HEALTHZ": "open",
        "SIDECAR_CLIENT_AUTH_ENDPOINTS_READYZ": "open",
    }
    assert "client_auth" not in sidecar_config(objects)
    for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        probe = sidecar[kind]["httpGet"]
        assert probe["scheme"] == "HTTPS" and probe["path"] == path, kind
        assert port_number(sidecar, probe["port"]) == SIDECAR_PORT
    # Annotation-based discovery hands the pod to the HTTPS job.
    assert template["metadata"]["annotations"]["prometheus.io/scheme"] == "https"

    [service] = by_kind(objects, "Service")
    [port] = service["spec"]["ports"]
    assert port["port"] == 443 and port["name"] == "https"
    assert port_number(sidecar, port["targetPort"]) == SIDECAR_PORT


def test_the_front_door_placeholders_keep_the_sidecar_from_starting(tmp_path: Path) -> None:
    """Forgotten placeholders fail closed: `check` (and so `run`) refuses them."""
    objects = kustomize_build(front_door_overlay(tmp_path, {}))
    env, config = pod_env(objects, tmp_path / "pod")
    out = run([sys.executable, "-m", "sidecar", "check", "--config", str(config)], env=env)
    assert out.returncode != 0, out.stdout
    assert "tls.certificate" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_the_front_door_config_passes_check_with_the_secrets_mounted(tmp_path: Path) -> None:
    objects = kustomize_build(front_door_overlay(tmp_path, real_secrets(tmp_path)))
    env, config = pod_env(objects, tmp_path / "pod")
    out = run(
        [sys.executable, "-m", "sidecar", "check", "--config", str(config)],
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tls ok: " in out.stdout and "(CN=front-door," in out.stdout, out.stdout
    assert "client_auth ok: 4 client(s)" in out.stdout, out.stdout  # alice, bob, ci, prometheus
    assert "healthz open, readyz open" in out.stdout, out.stdout


def test_the_front_door_keeps_the_probes_open_whatever_the_config_says(tmp_path: Path) -> None:
    """The kubelet sends no credential: a sidecar.yaml that closes /healthz
    and /readyz is overridden by the component, the other rules are not."""
    objects = kustomize_build(front_door_overlay(tmp_path, real_secrets(tmp_path)))
    env, config = pod_env(objects, tmp_path / "pod")
    closed = tmp_path / "closed.yaml"
    closed.write_text(
        config.read_text()
        + "client_auth:\n  endpoints: {healthz: authenticated, readyz: authenticated, "
        "metrics: open}\n"
    )
    out = run([sys.executable, "-m", "sidecar", "check", "--config", str(closed)], env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "endpoints: metrics open, healthz open, readyz open" in out.stdout, out.stdout


async def https_get(port: int, path: str, user: str | None = None) -> int:
    """As the kubelet probes: HTTPS, the certificate not verified."""
    headers = {}
    if user is not None:
        pair = f"{user}:{PASSWORDS[user]}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(f"https://127.0.0.1:{port}{path}", ssl=False, headers=headers) as response,
    ):
        await response.read()
        return response.status


async def presented_name(port: int) -> str:
    """The common name of the certificate a new connection is shown."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=context), 30)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    [attribute] = x509.load_der_x509_certificate(der).subject
    return str(attribute.value)


def swap_volume(folder: Path, files: dict[str, bytes], stamp: str) -> None:
    """What the kubelet does on a Secret update: a new timestamped folder,
    then ..data re-pointed at it in one rename."""
    fresh = folder / stamp
    fresh.mkdir()
    for key, data in files.items():
        (fresh / key).write_bytes(data)
    (folder / "..data_tmp").symlink_to(stamp)
    os.replace(folder / "..data_tmp", folder / "..data")


class Pod:
    """The rendered sidecar container running on loopback."""

    def __init__(self, port: int, env: dict[str, str], config: Path) -> None:
        self.port = port
        self.env = env
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None


@asynccontextmanager
async def front_door_pod(tmp_path: Path, objects: list[dict[str, Any]]) -> AsyncIterator[Pod]:
    """``objects``' sidecar container run on loopback, its Secrets and
    ConfigMaps laid out under tmp_path/pod as the kubelet mounts them; up once
    /healthz answers over HTTPS. Stopped with SIGTERM: it must exit 0 and
    never have logged a password or the scrape token."""
    env, config = pod_env(objects, tmp_path / "pod")
    pod = Pod(free_port(), env, config)
    env["SIDECAR_LISTEN"] = f"127.0.0.1:{pod.port}"
    env["SIDECAR_CACHE_DIR"] = str(tmp_path / "cache")
    for index in (0, 1):  # nothing leaves the machine: closed loopback ports
        env[f"SIDECAR_UPSTREAMS_{index}_URL"] = f"http://127.0.0.1:{free_port()}"
    proc = pod.proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(config),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(300):  # bounded: start-up on a loaded machine
            try:
                status = await https_get(pod.port, "/healthz")
                break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"nothing answers HTTPS on {pod.port}")
        assert status == 200
        yield pod
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    secrets = [*PASSWORDS.values(), SCRAPE_TOKEN]
    assert not [p for p in secrets if p in err.decode()]  # never logged


async def test_the_front_door_pod_serves_probes_and_rotates_secrets_in_place(
    tmp_path: Path,
) -> None:
    """The rendered sidecar container run on loopback: probes over HTTPS
    without credentials, the rest behind the door, then a Secret update
    (htpasswd and certificate) taken up by the running process."""
    objects = kustomize_build(front_door_overlay(tmp_path, real_secrets(tmp_path)))
    async with front_door_pod(tmp_path, objects) as pod:
        port, env, config = pod.port, pod.env, pod.config
        assert await presented_name(port) == "front-door"
        status = await https_get(port, "/readyz")
        assert status in (200, 503)  # ready or not, never asked for a credential
        assert await https_get(port, "/metrics") == 401
        assert await https_get(port, "/metrics", "alice") == 200
        # The image's HEALTHCHECK in this container: HTTPS, no credential.
        code, out, err = await run_healthcheck(config, env)
        assert code == 0, err
        assert out == f"healthy: https://127.0.0.1:{port}/healthz: 200\n"

        users = tmp_path / "rotated.htpasswd"
        tool = require_tool("htpasswd")
        subprocess.run(
            [str(tool), "-cbB", str(users), "carol", PASSWORDS["carol"]], check=True, timeout=60
        )
        pair = tmp_path / "rotated"
        pair.mkdir()
        cert, key = self_signed(pair, "rotated")
        swap_volume(
            tmp_path / "pod" / CLIENT_AUTH_SECRET,
            {"htpasswd": users.read_bytes(), "tokens": b""},
            "..2025_01_02_00_00_00.000000002",
        )
        swap_volume(
            tmp_path / "pod" / TLS_SECRET,
            {"tls.crt": cert.read_bytes(), "tls.key": key.read_bytes()},
            "..2025_01_02_00_00_00.000000002",
        )
        # Polled with alice, not carol: failed checks count towards the
        # throttle (429 for a minute), and alice fails once, when she is gone.
        for _ in range(600):  # bounded: polls every 2 s, acts once settled
            status = await https_get(port, "/metrics", "alice")
            if status != 200:
                break
            await asyncio.sleep(0.1)
        assert status == 401
        assert await https_get(port, "/metrics", "carol") == 200
        for _ in range(600):
            subject = await presented_name(port)
            if subject == "rotated":
                break
            await asyncio.sleep(0.1)
        assert subject == "rotated"
        assert pod.proc is not None and pod.proc.returncode is None  # no restart


# ====================================================================== Containerfile


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_containerfile_follows_the_basic_rules() -> None:
    steps = instructions(CONTAINERFILE)
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0])
        for w, a in steps
        if w == "FROM"
    ]
    assert len(bases) >= 2, "multi-stage: build, then a runtime without the build tools"
    for base in bases:
        tag = base.rsplit("/", 1)[-1]
        assert ":" in tag and not tag.endswith(":latest"), base
        assert base.startswith("python:3.11-slim"), base
    runtime = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    users = [a for w, a in runtime if w == "USER"]
    assert users, "the runtime stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == 10001  # numeric: runAsNonRoot can verify it

    env: dict[str, str] = {}
    for word, rest in runtime:
        if word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    # The sidecar tunes malloc itself (sidecar/heap.py): an image that set
    # MALLOC_* would override it and differ from `goproxy-sidecar run`.
    assert not [key for key in env if key.startswith("MALLOC_")], env

    healthchecks = [a for w, a in runtime if w == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    # The sidecar's own probe: it reads the config as `run` does (port, tls,
    # the /healthz rule), where a fixed http:// URL fails once tls is set.
    assert json.loads(healthchecks[0].split(" CMD ", 1)[1]) == [
        "goproxy-sidecar",
        "health",
        "--config",
        CONFIG_MOUNT,
    ]
    build = steps[: max(i for i, (w, _) in enumerate(steps) if w == "FROM")]
    assert any("goproxy-sidecar health --help" in a for w, a in build if w == "RUN")
    # A build without a compiler would ship the slow, interpreted modules.
    assert any("running_compiled()" in a for w, a in build if w == "RUN")
    assert ("EXPOSE", str(SIDECAR_PORT)) in runtime
    [entrypoint] = [json.loads(a) for w, a in runtime if w == "ENTRYPOINT"]
    assert entrypoint == ["goproxy-sidecar", "run", "--config", CONFIG_MOUNT]
    volumes = [json.loads(a) for w, a in runtime if w == "VOLUME"]
    assert [CACHE_MOUNT] in volumes


def test_podman_builds_keep_the_healthcheck() -> None:
    """podman/buildah build the OCI format by default, which has no
    HEALTHCHECK: every podman command shown asks for the docker format."""
    commands = []
    for path in (CONTAINERFILE, REPO / "README.md"):
        text = re.sub(r"\\\n[#\s]*", " ", path.read_text())  # join continuation lines
        commands += re.findall(r"(?:podman|buildah) (?:build|bud) [^\n]*", text)
    assert len(commands) >= 2, commands
    for command in commands:
        assert "--format docker" in command, command


def test_containerfile_context_holds_what_the_build_copies() -> None:
    ignore = (DEPLOY / "Containerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for needed in (
        "pyproject.toml",
        "setup.py",  # the mypyc build of the per-request modules
        "sidecar",
        "policies",
        "deploy/kubernetes/base/sidecar.yaml",
    ):
        assert needed in allowed, needed
        assert (REPO / needed).exists(), needed


def healthcheck_command(config: Path) -> list[str]:
    """The Containerfile's HEALTHCHECK, run from this checkout with ``config``
    in place of the image's /etc/goproxy-sidecar/sidecar.yaml."""
    [check] = [a for w, a in instructions(CONTAINERFILE) if w == "HEALTHCHECK"]
    command: list[str] = json.loads(check.split(" CMD ", 1)[1])
    assert command[0] == "goproxy-sidecar"
    return [sys.executable, "-m", "sidecar"] + [
        str(config) if part == CONFIG_MOUNT else part for part in command[1:]
    ]


async def run_healthcheck(config: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """The HEALTHCHECK as Docker runs it, without blocking this event loop
    (the sidecar under test may be serving on it)."""
    proc = await asyncio.create_subprocess_exec(
        *healthcheck_command(config),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_containerfile_healthcheck_passes_on_a_live_sidecar(
    fake_upstreams: Callable[..., Any], sidecar_client: Callable[..., Any], tmp_path: Path
) -> None:
    [(_, url)] = await fake_upstreams(1)
    client, _ = await sidecar_client([url])
    port = client.server.port
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f'listen: "127.0.0.1:{port}"\nupstreams: [{{name: athens, url: "{url}"}}]\n'
        f'cache: {{dir: "{tmp_path / "cache"}"}}\n'
    )
    code, out, err = await run_healthcheck(config, clean_env())
    assert code == 0, err
    assert out == f"healthy: http://127.0.0.1:{port}/healthz: 200\n"
    await client.close()
    code, out, err = await run_healthcheck(config, clean_env())
    assert code == 1, out  # Docker: 1 is "unhealthy"
    assert "unhealthy" in err and "Traceback" not in err, err


def test_debian_deps_script_is_valid_bash() -> None:
    out = run(["bash", "-n", str(REPO / "scripts" / "debian-deps.sh")])
    assert out.returncode == 0, out.stderr
