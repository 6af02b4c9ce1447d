"""``goproxy-sidecar run | check | eval`` — the command line.

Heavy imports (aiohttp, regopy) happen inside the subcommand that needs them
so ``check`` and ``--help`` start fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sidecar.errors import ConfigError, SidecarError

EXIT_OK = 0
EXIT_INVALID = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="goproxy-sidecar",
        description="Policy-driven circuit-breaker sidecar for Go module proxies.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve (the embedded default config without --config)")
    run.add_argument("--config", help="sidecar.yaml")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    check = sub.add_parser("check", help="validate the config and compile the policies")
    check.add_argument("--config", help="sidecar.yaml (default: the embedded default)")
    ev = sub.add_parser("eval", help="print the policy decision for one input document")
    ev.add_argument("--config", help="sidecar.yaml (default: the embedded default)")
    ev.add_argument("--input", required=True, help="policy input JSON file ('-' for stdin)")
    _cache_parsers(sub)
    return p


def _cache_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``cache ls|purge|verify`` and ``warm``: no running sidecar needed (sidecar/cache_cli.py)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="sidecar.yaml (default: the embedded default)")
    cache = sub.add_parser("cache", help="inspect and maintain the local cache")
    ops = cache.add_subparsers(dest="cache_command", required=True)
    ls = ops.add_parser("ls", parents=[common], help="entries: size, age, kind, last verified")
    ls.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    purge = ops.add_parser("purge", parents=[common], help="remove a module or one version")
    purge.add_argument("target", metavar="MODULE[@VERSION]")
    ops.add_parser("verify", parents=[common],
                   help="hash every entry; evict and report mismatches (exit 1 if any)")
    warm = sub.add_parser("warm", parents=[common],
                          help="prefetch every module version of a go.sum into the cache")
    warm.add_argument("go_sum", metavar="GO.SUM")
    warm.add_argument("--jobs", type=int, default=8, help="concurrent fetches (default 8)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "check":
            return _check(args)
        if args.command in ("cache", "warm"):
            return _cache(args)
        return _eval(args)
    except ConfigError as exc:
        print(f"goproxy-sidecar: invalid config:\n{_indent(str(exc))}", file=sys.stderr)
        return EXIT_INVALID
    except SidecarError as exc:
        print(f"goproxy-sidecar: {exc}", file=sys.stderr)
        return EXIT_INVALID


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def _run(args: argparse.Namespace) -> int:
    from sidecar.config import load_config
    from sidecar.runtime import run_forever

    config = load_config(args.config)
    return run_forever(config, args.log_level)


def _check(args: argparse.Namespace) -> int:
    from sidecar.config import load_config

    config = load_config(args.config)
    print(f"config ok: {len(config.upstreams)} upstream(s), listen {config.listen}")
    return EXIT_OK


def _cache(args: argparse.Namespace) -> int:
    from sidecar import cache_cli

    if args.command == "warm":
        return cache_cli.warm(args.config, args.go_sum, args.jobs)
    if args.cache_command == "ls":
        return cache_cli.cache_ls(args.config, args.json)
    if args.cache_command == "purge":
        return cache_cli.cache_purge(args.config, args.target)
    return cache_cli.cache_verify(args.config)


def _eval(args: argparse.Namespace) -> int:
    raise SidecarError("eval needs the policy engine (not built yet)")
