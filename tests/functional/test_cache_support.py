"""Helpers shared by the cache tests (no tests in here)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.cache.layout import Layout, read_record, records
from sidecar.cache.pack import Pack
from sidecar.config import CacheConfig
from sidecar.errors import CacheError

ZIP = "github.com/!azure/go-autorest/@v/v1.0.0.zip"
MOD = "github.com/!azure/go-autorest/@v/v1.0.0.mod"
INFO = "github.com/!azure/go-autorest/@v/v1.0.0.info"
LIST = "github.com/!azure/go-autorest/@v/list"
LATEST = "github.com/!azure/go-autorest/@latest"
BRANCH_INFO = "github.com/!azure/go-autorest/@v/master.info"


def cache_config(tmp_path: Path, **kw: Any) -> CacheConfig:
    return CacheConfig(dir=str(kw.pop("dir", tmp_path / "cache")), enabled=True, **kw)


@pytest.fixture
def cached_sidecar(sidecar_client, tmp_path):
    """A sidecar with the cache on (control loop off: the plan stays all-allow)."""

    async def start(urls: list[str], **kw: Any):
        cache = kw.pop("cache", None) or cache_config(tmp_path, **kw.pop("cache_kw", {}))
        client, sc = await sidecar_client(urls, run_control=False, cache=cache, **kw)
        await sc.cache.wait_loaded()
        return client, sc

    return start


def keys_on_disk(directory: str | Path) -> list[str]:
    """Keys of every committed entry: record files and pack rows."""
    layout = Layout.at(str(directory))
    files = [r.key for _p, r in records(layout) if r is not None]
    return sorted(files + packed_keys(directory))


def packed_keys(directory: str | Path) -> list[str]:
    pack = Pack(Layout.at(str(directory)).pack)
    try:
        return sorted(key for r, key, _t in pack.records() if r is not None)
    except CacheError:  # no usable pack (a test put a directory there)
        return []
    finally:
        pack.close()


def record_of(directory: str | Path, key: str):
    layout = Layout.at(str(directory))
    record = read_record(layout, layout.record_path(key))
    if record is None:
        pack = Pack(layout.pack)
        try:
            record = pack.record(key)
        finally:
            pack.close()
    return record


def blob_of(directory: str | Path, key: str) -> Path:
    layout = Layout.at(str(directory))
    record = record_of(directory, key)
    assert record is not None, key
    return Path(layout.blob_path(record.blob))


def temp_files(directory: str | Path) -> list[str]:
    tmp = Path(Layout.at(str(directory)).tmp)
    return sorted(os.listdir(tmp)) if tmp.exists() else []


def all_blobs(directory: str | Path) -> list[str]:
    out = []
    for _d, _dirs, files in os.walk(Layout.at(str(directory)).blobs):
        out.extend(files)
    return sorted(out)


def metric(sc, name: str, **labels: str) -> float:
    value = sc.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)


async def settled(sc, entries: int, timeout: float = 5.0) -> None:
    """Wait until the store holds ``entries`` entries, all on disk (commits run
    after the reply; small bodies are indexed at once and written behind)."""
    await wait_for(
        lambda: sc.cache.summary()["entries"] == entries,
        timeout,
        f"{entries} cache entries, have {sc.cache.summary()}",
    )
    await asyncio.wait_for(sc.cache.written(), timeout)  # small ones: on disk too
