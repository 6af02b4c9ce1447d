"""``goproxy-sidecar run | check | eval | cache | warm | health`` — the command line.

Heavy imports (aiohttp, the server) happen inside the subcommand that needs
them so ``check`` and ``--help`` start fast; regopy is imported with the
package, first of all (see sidecar.native).

Every error ends the command with one line on stderr and one of the EXIT_*
codes below, never a traceback: the errors of the tree in sidecar.errors, an
OSError nothing translated, a closed output pipe, Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from sidecar.config import DEFAULT_BACKUP_URL, DEFAULT_LISTEN, DEFAULT_PRIMARY_URL
from sidecar.errors import CacheError, ConfigError, ConfigErrors, ListenError, SidecarError

if TYPE_CHECKING:
    from sidecar.config import Config
    from sidecar.policy.base import PolicyEngine
    from sidecar.routing import Router

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and part of its work failed (warm, cache verify)
EXIT_INVALID = 2  # bad usage, config or input (argparse's own code for usage errors)
EXIT_CANNOT_LISTEN = 3  # the listen address is in use, not permitted or not local
EXIT_IO = 4  # a file or directory the command needs cannot be read or written
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a death by SIGINT
EXIT_BROKEN_PIPE = 141  # the reader closed our stdout, as a shell reports SIGPIPE

LOG_LEVELS = ("debug", "info", "warning", "error")
RUN_DESCRIPTION = (
    "Serve until SIGTERM or SIGINT. Without --config, the embedded default config: listen on "
    f"{DEFAULT_LISTEN}, upstreams athens ({DEFAULT_PRIMARY_URL}) then public "
    f"({DEFAULT_BACKUP_URL}), cache in $XDG_CACHE_HOME/goproxy-sidecar (else "
    "~/.cache/goproxy-sidecar). SIDECAR_* variables override any key, with or without --config."
)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INVALID, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """``--version``, looked up only when asked: importlib.metadata costs ~20 ms."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        print(f"{parser.prog} {version()}")
        parser.exit()


def version() -> str:
    """The installed distribution's version; the package's own from a bare source tree."""
    from importlib import metadata

    try:
        return metadata.version("goproxy-sidecar")
    except metadata.PackageNotFoundError:
        from sidecar import __version__

        return f"{__version__} (not installed: from the source tree)"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="goproxy-sidecar",
        description="Policy-driven circuit-breaker sidecar for Go module proxies.",
    )
    p.add_argument("--version", action=_Version, help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="serve (the embedded default config without --config)",
        description=RUN_DESCRIPTION,
    )
    run.add_argument("--config", help="sidecar.yaml (default: the embedded default above)")
    run.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="least severe level written to the JSON log on stderr: "
        f"{', '.join(LOG_LEVELS)} (default info)",
    )
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
    check.add_argument(
        "--auth",
        metavar="USER",
        help="with --route: whether USER (a client_auth name, or @networks) may fetch MODULE",
    )
    ev = sub.add_parser("eval", help="print the policy decision for one input document")
    ev.add_argument("--config", help="sidecar.yaml (default: the embedded default)")
    ev.add_argument("--input", required=True, help="policy input JSON file ('-' for stdin)")
    _cache_parsers(sub)
    _health_parser(sub)
    return p


def _cache_parsers(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``cache ls|purge|verify`` and ``warm``: no running sidecar needed (sidecar/cache_cli.py)."""
    common = _Parser(add_help=False)
    common.add_argument("--config", help="sidecar.yaml (default: the embedded default)")
    cache = sub.add_parser("cache", help="inspect and maintain the local cache")
    ops = cache.add_subparsers(dest="cache_command", required=True)
    ls = ops.add_parser("ls", parents=[common], help="entries: size, age, kind, last verified")
    ls.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    purge = ops.add_parser("purge", parents=[common], help="remove a module or one version")
    purge.add_argument("target", metavar="MODULE[@VERSION]")
    verify = ops.add_parser(
        "verify",
        parents=[common],
        help="hash every entry; evict and report mismatches (exit 1 if any)",
    )
    verify.add_argument(
        "--sumdb",
        action="store_true",
        help="also check every cached .mod/.zip against the checksum database",
    )
    warm = sub.add_parser(
        "warm", parents=[common], help="prefetch every module version of a go.sum into the cache"
    )
    warm.add_argument("go_sum", metavar="GO.SUM")
    warm.add_argument(
        "--jobs", type=_positive, default=8, help="concurrent fetches, at least 1 (default 8)"
    )


def _health_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``health``: the image's HEALTHCHECK (sidecar/healthcheck.py)."""
    health = sub.add_parser(
        "health",
        help="ask the running sidecar's /healthz as its config says (exit 0: healthy, 1: not)",
        description="Read the config as `run` does (SIDECAR_* variables included) and GET "
        "/healthz at its listen address (loopback for 0.0.0.0 and [::]): HTTPS when tls is "
        "set, a bearer token only when client_auth.endpoints.healthz is not open.",
    )
    health.add_argument("--config", help="sidecar.yaml (default: the embedded default)")
    health.add_argument(
        "--token-env",
        metavar="VAR",
        help="the environment variable holding a bearer token, for a /healthz that is not open",
    )
    health.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        default=None,
        help="how long to wait for the answer (default 4)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # a reader gone early shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # `cache ls | head`: stop quietly, as a tool killed by SIGPIPE would. Python
        # flushes stdout again at exit; devnull takes what is left.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        _say(_config_problems(exc.errors if isinstance(exc, ConfigErrors) else [exc]))
        return EXIT_INVALID
    except ListenError as exc:
        _say(str(exc))
        return EXIT_CANNOT_LISTEN
    except CacheError as exc:
        _say(str(exc))
        return EXIT_IO
    except SidecarError as exc:
        _say(str(exc))
        return EXIT_INVALID
    except OSError as exc:  # one nothing translated: still the file's fault, not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        _say(f"{where}{exc.strerror or exc}")
        return EXIT_IO


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args)
    if args.command == "check":
        return _check(args)
    if args.command in ("cache", "warm"):
        return _cache(args)
    if args.command == "health":
        return _health(args)
    return _eval(args)


def _say(message: str) -> None:
    print(f"goproxy-sidecar: {message}", file=sys.stderr)


def _config_problems(errors: list[ConfigError]) -> str:
    """One problem on one line; several as a count, then one indented line each."""
    if len(errors) == 1:
        return f"invalid config: {errors[0]}"
    return f"invalid config, {len(errors)} problems:" + "".join(f"\n  {e}" for e in errors)


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

    config = load_config(args.config)  # every routing pattern compiled and checked already
    router = Router(config)
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
    if config.tls.enabled:
        from sidecar.server.tls import describe

        print(describe(config.tls))
    for module in args.route:
        print(f"route {module}: {_describe_route(router, module)}")
    _check_auth(config, router, args)
    return EXIT_OK


def _check_auth(config: Config, router: Router, args: argparse.Namespace) -> None:
    """The credential files loaded, and what ``--auth`` may fetch of ``--route``."""
    from sidecar.auth.explain import explain, summary

    cfg = config.client_auth
    if not cfg.enabled:
        if args.auth is not None:
            raise SidecarError("--auth: client_auth is not enabled in this config")
        return
    line, credentials = summary(cfg)
    print(line)
    if args.auth is not None:
        if not args.route:
            raise SidecarError("--auth needs at least one --route MODULE")
        for answer in explain(cfg, credentials, router, args.auth, args.route):
            print(answer)


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
    return cache_cli.cache_verify(args.config, args.sumdb)


def _health(args: argparse.Namespace) -> int:
    from sidecar.config import load_config
    from sidecar.healthcheck import DEFAULT_TIMEOUT_S, check, probe_for

    token = None
    if args.token_env is not None:
        token = os.environ.get(args.token_env)
        if not token:  # its name, never its value
            raise SidecarError(f"--token-env: environment variable {args.token_env} is not set")
    probe = probe_for(load_config(args.config))
    healthy, line = check(probe, token, args.timeout or DEFAULT_TIMEOUT_S)
    if not healthy:
        _say(line)
        return EXIT_FAILED
    print(line)
    return EXIT_OK


def _eval(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from sidecar.config import load_config
    from sidecar.policy import make_engine

    config = load_config(args.config)
    text = _read_stdin() if args.input == "-" else _read(args.input)
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
    except UnicodeDecodeError as exc:
        raise SidecarError(f"{path}: not UTF-8 text (byte {exc.start})") from exc


def _read_stdin() -> str:
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SidecarError(f"-: not UTF-8 text (byte {exc.start})") from exc


async def _evaluate(engine: PolicyEngine, document: dict[str, object]) -> dict[str, object]:
    try:
        warning = await engine.load()
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        decisions = await engine.evaluate(document)
    finally:
        await engine.close()
    return {name: d.as_json() for name, d in decisions.items()}
