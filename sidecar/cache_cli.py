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
from sidecar.errors import SidecarError
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
    print(f"{'SIZE':>9}  {'AGE':>5}  {'KIND':<14} {'VERIFIED':<9} KEY", file=out)
    total = 0
    for item in entries:
        r = item.record
        total += r.size
        kind = (
            r.kind
            if r.immutable
            else (
                f"{r.kind},stale"
                if now - r.stored >= config.cache.mutable_ttl
                else f"{r.kind},fresh"
            )
        )
        verified = f"{_age(now - r.verified)} ago" if item.present else "BROKEN"
        print(
            f"{format_size(r.size):>9}  {_age(now - r.stored):>5}  {kind:<14} {verified:<9} "
            f"{r.key}",
            file=out,
        )
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
    count, size = purge(layout, module_keys(layout, module, version if at else None))
    print(f"purged {count} entries ({format_size(size)}) of {target}", file=out)
    return EXIT_OK


def cache_verify(
    config_path: str | None, out: TextIO = sys.stdout, err: TextIO = sys.stderr
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
    return EXIT_FAILED if report.bad else EXIT_OK


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
    except (OSError, UnicodeDecodeError) as exc:
        raise SidecarError(f"warm: cannot read {go_sum}: {exc}") from exc
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
    fetched = [r for r in results if r.status == "fetched"]
    failed = [r for r in results if r.status == "failed"]
    cached = len(results) - len(fetched) - len(failed)
    for problem in problems:
        print(f"SKIPPED {problem}", file=out)
    for r in failed:
        print(f"FAILED {r.artifact.name}: {r.error}", file=out)
    print(
        f"warm: {len(results)} artifacts: {len(fetched)} fetched "
        f"({format_size(sum(r.size for r in fetched))}), {cached} already cached, "
        f"{len(failed)} failed" + (f", {len(problems)} go.sum lines skipped" if problems else ""),
        file=out,
    )
    return EXIT_FAILED if failed or problems else EXIT_OK


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
