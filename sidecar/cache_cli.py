"""``goproxy-sidecar cache ls|purge|verify`` and ``goproxy-sidecar warm``.

None of them needs a running sidecar; all read the cache directory from the
config (``--config``, else the embedded default). Output for people goes to
stdout, progress to stderr; ``ls --json`` is for scripts.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from sidecar.cache.layout import Layout, Record
from sidecar.cache.offline import list_entries, module_keys, purge, verify_all
from sidecar.config import Config, load_config
from sidecar.errors import RequestError, SidecarError
from sidecar.units import format_size

EXIT_OK = 0
EXIT_FAILED = 1


def cache_ls(config_path: str | None, as_json: bool = False, out: TextIO = sys.stdout) -> int:
    config = load_config(config_path)
    now = time.time()
    entries = list_entries(Layout.at(config.cache.dir))
    if as_json:
        rows = [_row(item.record, item.present, config, now) for item in entries]
        json.dump(rows, out, indent=1)
        out.write("\n")
        return EXIT_OK
    table = [("SIZE", "AGE", "KIND", "VERIFIED", "KEY")]
    for item in entries:
        r = item.record
        kind = r.kind
        if not r.immutable:
            kind += ",stale" if now - r.stored >= config.cache.mutable_ttl else ",fresh"
        verified = f"{_age(now - r.verified)} ago" if item.present else "BROKEN"
        table.append((format_size(r.size), _age(now - r.stored), kind, verified, r.key))
    # Columns as wide as their widest cell: kinds run from "zip" to "sumdb-supported,stale".
    w = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        out.write(
            f"{row[0]:>{w[0]}}  {row[1]:>{w[1]}}  {row[2]:<{w[2]}}  {row[3]:<{w[3]}}  {row[4]}\n"
        )
    total = sum(item.record.size for item in entries)
    print(
        f"{len(entries)} entries, {format_size(total)} of {format_size(config.cache.max_bytes)}"
        f" in {config.cache.dir}",
        file=out,
    )
    return EXIT_OK


def _row(record: Record, present: bool, config: Config, now: float) -> dict[str, Any]:
    return {
        "key": record.key,
        "kind": record.kind,
        "size": record.size,
        "age_s": round(now - record.stored, 3),
        "immutable": record.immutable,
        "stale": (not record.immutable) and now - record.stored >= config.cache.mutable_ttl,
        "verified_age_s": round(now - record.verified, 3),
        "present": present,
        "sha256": record.sha256,
        "upstream": record.upstream,
    }


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def cache_purge(config_path: str | None, target: str, out: TextIO = sys.stdout) -> int:
    """``MODULE`` (every version, list, @latest) or ``MODULE@VERSION``."""
    config = load_config(config_path)
    module, at, version = target.partition("@")
    if at and not version:
        raise SidecarError(f"purge: empty version in {target!r}")
    layout = Layout.at(config.cache.dir)
    try:
        keys = module_keys(layout, module, version if at else None)
    except RequestError as exc:
        raise SidecarError(f"purge {target!r}: {exc.message}") from exc
    count, size = purge(layout, keys)
    print(f"purged {count} entries ({format_size(size)}) of {target}", file=out)
    return EXIT_OK


def cache_verify(
    config_path: str | None,
    sumdb: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    config = load_config(config_path)
    bar = Progress("verify", err)
    report = verify_all(Layout.at(config.cache.dir), lambda n, total: bar.update(n, total))
    bar.close()
    for key, reason in report.bad:
        print(f"MISMATCH {key}: {reason}", file=out)
    print(
        f"verified {report.checked} entries ({format_size(report.bytes)}): {len(report.bad)} bad",
        file=out,
    )
    failed = bool(report.bad)
    if sumdb:
        failed = _verify_sumdb(config, out, err) or failed
    return EXIT_FAILED if failed else EXIT_OK


def _verify_sumdb(config: Config, out: TextIO, err: TextIO) -> bool:
    """The checksum-database pass; True if an entry mismatched or could not be vouched for."""
    import asyncio

    from sidecar.cache_sumdb import verify_sumdb

    bar = Progress("sumdb", err)
    report = asyncio.run(verify_sumdb(config, lambda n, total: bar.update(n, total)))
    bar.close()
    for key, reason in report.bad:
        print(f"MISMATCH {key}: {reason}", file=out)
    for key, reason in report.unvouched:
        print(f"UNVOUCHED {key}: {report.database} cannot vouch: {reason}", file=out)
    print(
        f"checked {report.checked} .mod/.zip entries against {report.database}: "
        f"{len(report.bad)} mismatched, {len(report.unvouched)} cannot vouch, "
        f"{report.skipped} skipped (never looked up)",
        file=out,
    )
    return bool(report.bad or report.unvouched)


def warm(
    config_path: str | None,
    go_sum: str,
    jobs: int,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    import asyncio

    from sidecar.cache import warm as warming

    config = load_config(config_path)
    try:
        with open(go_sum, encoding="utf-8") as f:
            plan = warming.parse_go_sum(f.read())
    except OSError as exc:
        raise SidecarError(f"warm: {go_sum}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise SidecarError(f"warm: {go_sum}: not UTF-8 text (byte {exc.start})") from exc
    bar = Progress("warm", err)
    done: list[warming.Result] = []

    def on_result(result: warming.Result) -> None:
        done.append(result)
        fetched = sum(r.size for r in done)
        failed = sum(r.status == "failed" for r in done)
        bar.update(
            len(done),
            len(plan.artifacts),
            f"{format_size(fetched)}" + (f", {failed} failed" if failed else ""),
        )

    results = asyncio.run(warming.warm(config, plan.artifacts, jobs, on_result))
    bar.close()
    return _warm_summary(results, plan.problems, out)


def _warm_summary(results: list[Any], problems: list[str], out: TextIO) -> int:
    """Skipped lines and modules are reported, but only a failed fetch fails the run."""
    by_status: dict[str, list[Any]] = {"fetched": [], "cached": [], "skipped": [], "failed": []}
    for r in results:
        by_status[r.status].append(r)
    for problem in problems:
        print(f"SKIPPED {problem}", file=out)
    kept_out: dict[tuple[str, str], list[str]] = {}  # one line per module version, not per file
    for r in by_status["skipped"]:
        name = f"{r.artifact.module}@{r.artifact.version}"
        kept_out.setdefault((name, r.reason), []).append(r.artifact.ext)
    for (name, reason), exts in kept_out.items():
        print(f"SKIPPED {name} ({', '.join(exts)}): {reason}", file=out)
    for r in by_status["failed"]:
        print(f"FAILED {r.artifact.name}: {r.reason}", file=out)
    fetched, skipped, failed = by_status["fetched"], by_status["skipped"], by_status["failed"]
    counts = [
        f"{len(fetched)} fetched ({format_size(sum(r.size for r in fetched))})",
        f"{len(by_status['cached'])} already cached",
        *([f"{len(skipped)} skipped by routing rules"] if skipped else []),
        f"{len(failed)} failed",
        *([f"{len(problems)} go.sum lines skipped"] if problems else []),
    ]
    print(f"warm: {len(results)} artifacts: {', '.join(counts)}", file=out)
    return EXIT_FAILED if failed else EXIT_OK


class Progress:
    """A one-line progress bar on a terminal; a line per 10 % otherwise (CI logs)."""

    WIDTH = 24

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label = label
        self.stream = stream
        self.tty = stream.isatty()
        self._shown_tenth = -1
        self._drawn = False

    def update(self, done: int, total: int, extra: str = "") -> None:
        if total <= 0:
            return
        if self.tty:
            filled = self.WIDTH * done // total
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {extra}\033[K")
            self._drawn = True
        elif (tenth := 10 * done // total) > self._shown_tenth:
            self._shown_tenth = tenth
            self.stream.write(f"{self.label}: {done}/{total} ({10 * tenth}%) {extra}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
