"""The sidecar's own account of a run: /breakers, /metrics and its transition log."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.processes import Proc, wait_until

Labels = frozenset[tuple[str, str]]


@dataclass
class Metrics:
    """One scrape of /metrics: sample name -> {label set: value}."""

    samples: dict[str, dict[Labels, float]]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples: dict[str, dict[Labels, float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
        return cls(samples)

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for ls, v in self.samples.get(name, {}).items() if want <= ls)

    def transitions(self, upstream: str) -> dict[tuple[str, str, str], float]:
        """(from_state, to_state, reason) -> count, for one upstream."""
        out = {}
        for ls, v in self.samples.get("goproxy_sidecar_breaker_transitions_total", {}).items():
            d = dict(ls)
            if d["upstream"] == upstream and v:
                out[(d["from_state"], d["to_state"], d["reason"])] = v
        return out


class SidecarAccount:
    def __init__(self, url: str, proc: Proc) -> None:
        self.url = url
        self.proc = proc

    async def _get(self, path: str) -> str:
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.url + path) as r,
        ):
            assert r.status == 200, (path, r.status)
            return await r.text()

    async def breakers(self) -> dict[str, Any]:
        view: dict[str, Any] = json.loads(await self._get("/breakers"))
        return view

    async def metrics(self) -> Metrics:
        return Metrics.parse(await self._get("/metrics"))

    async def wait_breaker(self, upstream: str, deadline_s: float, **want: Any) -> dict[str, Any]:
        """Poll /breakers until ``upstream``'s view has every ``want`` key/value."""

        async def check() -> dict[str, Any] | None:
            view: dict[str, Any] = (await self.breakers())[upstream]
            return view if all(view.get(k) == v for k, v in want.items()) else None

        return await wait_until(
            f"/breakers[{upstream}] to show {want}", check, deadline_s, proc=self.proc
        )

    def logged_transitions(self) -> list[dict[str, Any]]:
        """Every "breaker transition" line of the sidecar's JSON log, in order."""
        return read_transitions(self.proc.log)


def read_transitions(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if '"breaker transition"' not in line:
            continue
        try:
            event: Mapping[str, Any] = json.loads(line)
        except ValueError:
            continue
        out.append(dict(event))
    return out
