"""Prometheus through the front door (components/front-door): the rendered
PodMonitor and the HTTPS job of deploy/prometheus/prometheus-kubernetes.yml
scrape /metrics over HTTPS, verifying the sidecar with the CA of the
goproxy-sidecar-scrape Secret and sending its bearer token. A real
Prometheus scrapes the rendered sidecar container on loopback with both.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.functional.test_cli import free_port
from tests.functional.test_deploy import (
    KUBERNETES,
    PROMETHEUS,
    SCRAPE_SECRET,
    SCRAPE_SECRET_DIR,
    SCRAPE_TOKEN,
    SERVICE_NAME,
    by_kind,
    discovered,
    front_door_overlay,
    kustomize_build,
    pod_template,
    real_secrets,
    scrape_secret_files,
    secret_files,
)
from tests.functional.test_deploy import front_door_pod as running_pod
from tests.tools import require_tool

PODMONITOR = KUBERNETES / "components" / "podmonitor"
HTTPS_JOB = "goproxy-sidecar-pods-https"
PLAIN_JOB = "goproxy-sidecar-pods"
OPERATOR_JOB = "podmonitor"  # what the Prometheus Operator makes of the PodMonitor


def sidecar_endpoint(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [monitor] = by_kind(objects, "PodMonitor")
    endpoint: dict[str, Any] = monitor["spec"]["podMetricsEndpoints"][0]
    return endpoint


def test_the_podmonitor_scrapes_the_front_door_over_https_with_a_token(tmp_path: Path) -> None:
    objects = kustomize_build(front_door_overlay(tmp_path, {}, before=(PODMONITOR,)))
    [monitor] = by_kind(objects, "PodMonitor")
    sidecar, athens = monitor["spec"]["podMetricsEndpoints"]
    assert sidecar["port"] == "http" and sidecar["scheme"] == "https"
    tls = sidecar["tlsConfig"]
    assert tls["serverName"] == SERVICE_NAME and not tls.get("insecureSkipVerify")
    auth = sidecar["authorization"]
    assert auth["type"] == "Bearer"
    # Both point at keys of a Secret the build holds (the Operator reads it
    # from the PodMonitor's own namespace).
    scrape = secret_files(objects, SCRAPE_SECRET)
    for ref in (tls["ca"]["secret"], auth["credentials"]):
        assert ref["name"] == SCRAPE_SECRET and ref["key"] in scrape, ref
    [secret] = [o for o in by_kind(objects, "Secret") if o["metadata"]["name"] == SCRAPE_SECRET]
    assert secret["metadata"].get("namespace") == monitor["metadata"].get("namespace")
    # Placeholders: never a usable credential or certificate.
    assert b"PLACEHOLDER" in scrape["token"] and b"BEGIN" not in scrape["ca.crt"]
    # Athens' own /metrics is not behind the door.
    assert athens["port"] == "athens"
    assert not {"scheme", "tlsConfig", "authorization"} & set(athens)
    # The annotation stays off: the PodMonitor is the only scraper.
    annotations = pod_template(objects)["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false"


def prometheus_yaml(
    port: int, annotations: dict[str, str], endpoint: dict[str, Any], secrets: Path
) -> str:
    """prometheus-kubernetes.yml with the scrape Secret under ``secrets`` and
    pod discovery replaced by one static target carrying the labels discovery
    would give the rendered pod (at 127.0.0.1:port), plus the job the
    Operator would make of the PodMonitor's sidecar endpoint."""
    text = (PROMETHEUS / "prometheus-kubernetes.yml").read_text()
    doc = yaml.safe_load(text.replace(SCRAPE_SECRET_DIR, str(secrets)))
    doc["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    doc.pop("rule_files")
    labels = discovered("127.0.0.1", {**annotations, "prometheus.io/port": str(port)})
    address = labels.pop("__address__")
    for job in doc["scrape_configs"]:
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": [address], "labels": labels}]
    tls, auth = endpoint["tlsConfig"], endpoint["authorization"]
    ref = {"ca": tls["ca"]["secret"], "token": auth["credentials"]}
    doc["scrape_configs"].append(
        {
            "job_name": OPERATOR_JOB,
            "scheme": endpoint["scheme"],
            "metrics_path": endpoint["path"],
            "tls_config": {
                "ca_file": str(secrets / ref["ca"]["key"]),
                "server_name": tls["serverName"],
            },
            "authorization": {
                "type": auth["type"],
                "credentials_file": str(secrets / ref["token"]["key"]),
            },
            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
        }
    )
    return yaml.safe_dump(doc)


async def targets(session: aiohttp.ClientSession, url: str) -> dict[str, list[dict[str, Any]]]:
    async with session.get(f"{url}/api/v1/targets") as r:
        body = await r.json()
    out: dict[str, list[dict[str, Any]]] = {}
    for target in body["data"]["activeTargets"]:
        out.setdefault(target["labels"]["job"], []).append(target)
    return out


async def test_prometheus_scrapes_the_front_door_pod(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    secrets = real_secrets(tmp_path)
    with_monitor = kustomize_build(
        front_door_overlay(tmp_path / "operator", secrets, before=(PODMONITOR,))
    )
    by_annotation = kustomize_build(front_door_overlay(tmp_path / "annotations", secrets))
    scrape = secret_files(with_monitor, SCRAPE_SECRET)
    assert scrape["token"].strip() == SCRAPE_TOKEN.encode()
    folder = scrape_secret_files(
        tmp_path / "prometheus-secrets", scrape["ca.crt"], scrape["token"].decode().strip()
    )
    async with running_pod(tmp_path, with_monitor) as pod:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            prometheus_yaml(
                pod.port,
                pod_template(by_annotation)["metadata"]["annotations"],
                sidecar_endpoint(with_monitor),
                folder,
            )
        )
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            str(prometheus),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stderr=asyncio.subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                found: dict[str, list[dict[str, Any]]] = {}
                for _ in range(600):  # bounded: start-up, then a 1 s scrape interval
                    try:
                        found = await targets(session, url)
                    except aiohttp.ClientError:
                        found = {}
                    healthy = [
                        t["health"] == "up"
                        for job in (HTTPS_JOB, OPERATOR_JOB)
                        for t in found.get(job, [])
                    ]
                    if len(healthy) == 2 and all(healthy):
                        break
                    await asyncio.sleep(0.1)
                for job in (HTTPS_JOB, OPERATOR_JOB):
                    [target] = found.get(job, [{"health": "absent", "lastError": ""}])
                    assert target["health"] == "up", (job, target["lastError"])
                    assert target["scrapeUrl"] == f"https://127.0.0.1:{pod.port}/metrics"
                # The plain job leaves the pod to the HTTPS one: never both.
                assert PLAIN_JOB not in found, found.get(PLAIN_JOB)
                query = f'count(goproxy_sidecar_cache_bytes{{job="{HTTPS_JOB}"}})'
                async with session.get(f"{url}/api/v1/query", params={"query": query}) as r:
                    result = (await r.json())["data"]["result"]
                assert result and int(result[0]["value"][1]) >= 1, result
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.communicate(), 60)


def test_the_scrape_token_is_not_sent_in_the_clear() -> None:
    """The token goes to HTTPS targets only: the plain job has none."""
    doc = yaml.safe_load((PROMETHEUS / "prometheus-kubernetes.yml").read_text())
    jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
    assert jobs[HTTPS_JOB]["scheme"] == "https"
    assert jobs[HTTPS_JOB]["authorization"]["credentials_file"].startswith(SCRAPE_SECRET_DIR)
    assert not jobs[HTTPS_JOB]["tls_config"].get("insecure_skip_verify")
    for key in ("authorization", "basic_auth", "bearer_token", "bearer_token_file"):
        assert key not in jobs[PLAIN_JOB], key
