"""``goproxy-sidecar run | check | eval`` — the command line.

Heavy imports (aiohttp, the server) happen inside the subcommand that needs
them so ``check`` and ``--help`` start fast; regopy is imported with the
package, first of all (see sidecar.native).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sidecar.errors import ConfigError, SidecarError

if TYPE_CHECKING:
    from sidecar.policy.base import PolicyEngine
    from sidecar.routing import Router

EXIT_OK = 0
EXIT_INVALID = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="goproxy-sidecar",
        description="Policy-driven circuit-breaker sidecar for Go module proxies.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve (the embedded default config without --config)")
    run.add_argument("--config", help="sidecar.yaml")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--loop",
        default="auto",
        choices=["auto", "uvloop", "asyncio"],
        help="event loop (auto: uvloop when installed)",
    )
    check = sub.add_parser("check", help="validate the config and compile the policies")
    check.add_argument("--config", help="sidecar.yaml (default: the embedded default)")
    check.add_argument(
        "--route",
        metavar="MODULE",
        action="append",
        default=[],
        help="also print how MODULE would be routed (repeatable)",
    )
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
    ops.add_parser(
        "verify",
        parents=[common],
        help="hash every entry; evict and report mismatches (exit 1 if any)",
    )
    warm = sub.add_parser(
        "warm", parents=[common], help="prefetch every module version of a go.sum into the cache"
    )
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
    return run_forever(config, args.log_level, args.loop)


def _check(args: argparse.Namespace) -> int:
    import asyncio

    from sidecar.config import load_config
    from sidecar.policy.embedded import EmbeddedEngine
    from sidecar.policy.files import discover
    from sidecar.routing import Router

    config = load_config(args.config)
    router = Router(config)  # compiles every routing pattern: ConfigError names a bad one
    # The OPA engine evaluates the same files on the server: compile them here too.
    engine = EmbeddedEngine(config.policy.paths, config.policy.decision)
    warning = asyncio.run(_load_and_close(engine))
    files = discover(config.policy.paths)
    print(f"config ok: {len(config.upstreams)} upstream(s), listen {config.listen}")
    print(
        f"policy ok: {len(files)} file(s), decision {config.policy.decision}, "
        f"engine {config.policy.engine.value}, mode {config.policy.mode.value}"
    )
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    for module in args.route:
        print(f"route {module}: {_describe_route(router, module)}")
    return EXIT_OK


def _describe_route(router: Router, module: str) -> str:
    from sidecar.errors import RequestError
    from sidecar.goproxy import check_module_path

    try:
        check_module_path(module)
    except RequestError as exc:
        raise SidecarError(f"--route {module!r}: not a module path ({exc.message})") from exc
    route = router.route(module)
    if route.deny:
        return f"denied (rule {route.rule})"
    where = ", ".join(route.targets) or "no upstream (private module, none has private_ok)"
    flags = [
        f"rule {route.rule}" if route.rule else "no rule",
        "private" if route.private else "public",
        "cache" if route.cache else "no cache",
    ]
    return f"{where} [{'; '.join(flags)}]"


async def _load_and_close(engine: PolicyEngine) -> str | None:
    try:
        return await engine.load()
    finally:
        await engine.close()


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
    import asyncio
    import json

    from sidecar.config import load_config
    from sidecar.policy import make_engine

    config = load_config(args.config)
    text = sys.stdin.read() if args.input == "-" else _read(args.input)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SidecarError(f"{args.input}:{exc.lineno}: not JSON: {exc.msg}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("upstreams"), dict):
        raise SidecarError(f"{args.input}: expected an object with an 'upstreams' object")
    decisions = asyncio.run(_evaluate(make_engine(config.policy), document))
    print(json.dumps(decisions, indent=2, sort_keys=True))
    return EXIT_OK


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise SidecarError(f"{path}: {exc.strerror}") from exc


async def _evaluate(engine: PolicyEngine, document: dict[str, object]) -> dict[str, object]:
    try:
        warning = await engine.load()
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        decisions = await engine.evaluate(document)
    finally:
        await engine.close()
    return {
        name: {"action": d.action.value, "reason": d.reason, "alert": d.alert}
        for name, d in decisions.items()
    }
