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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "check":
            return _check(args)
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


def _eval(args: argparse.Namespace) -> int:
    raise SidecarError("eval needs the policy engine (not built yet)")
