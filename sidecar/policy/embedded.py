"""The embedded engine: the policy files evaluated in-process by regopy (rego-cpp).

The policy is compiled once per version into a regopy ``Bundle``; each
evaluation only sets the input (as JSON text, parsed in C) and runs the
bundle's decision entry point. An interpreter is not safe to share between
threads (input and query are two calls on shared state), so every engine owns
one worker thread that does all its regopy work, compilation included;
regopy calls go through ctypes, which releases the GIL, so the event loop keeps
serving meanwhile. The worker runs at a lower CPU priority (``WORKER_NICE``):
where the sidecar has one core (a pinned process, a container's CPU limit), an
evaluation at the same priority took half of it from the event loop for its
8-40 ms every tick, and the requests in flight then made much of the p99
(issue 14). The loop rarely keeps the core busy a whole tick, so the
evaluation still ends well within its deadline.

rego-cpp checks less than OPA at compile time (an unknown function or an
unsafe variable only shows when evaluated), so ``load()`` also evaluates a
sample input before it reports success.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import regopy

import sidecar
from sidecar.breaker.state import Decision
from sidecar.errors import PolicyEvalError, PolicyLoadError
from sidecar.policy import files
from sidecar.policy.base import (
    BREAKER_DATA_PATH,
    PolicyEngine,
    parse_breaker_settings,
    parse_decisions,
    smoke_test,
    upstream_names,
)

# "(error 23:policies/sidecar/x.rego|39|1" then "(errormsg 16:this is unclosed)"
_ERROR_AT = re.compile(r"\(error (?:\d+:)?([^|\n]*)\|(\d+)\|(\d+)")
_ERROR_MSG = re.compile(r"\(errormsg (\d+):")

log = logging.getLogger("sidecar.policy")

# nice 10: about a tenth of a contended core (CFS weight 110 against 1024).
WORKER_NICE = 10


@dataclass(frozen=True, slots=True)
class _Compiled:
    interpreter: Any  # regopy.Interpreter: owned by the worker thread
    bundle: Any  # regopy.Bundle
    policy: files.PolicySet


class EmbeddedEngine(PolicyEngine):
    """Evaluates the ``.rego`` files under ``paths`` with regopy."""

    from_files = True

    def __init__(self, paths: Sequence[str], decision: str) -> None:
        super().__init__(decision)
        self.paths = tuple(paths)
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="policy-embedded", initializer=_lower_priority
        )
        self._compiled: _Compiled | None = None

    @property
    def name(self) -> str:
        return "embedded"

    @property
    def version(self) -> str | None:
        return self._compiled.policy.fingerprint if self._compiled else None

    async def load(self) -> str | None:
        if sidecar.REGOPY_LOADED_LATE:
            log.warning(
                "regopy was imported after the C++ runtime: each policy evaluation will "
                "leak memory; import sidecar before aiohttp (see README Troubleshooting)"
            )
        policy = await asyncio.to_thread(files.load_policy_set, self.paths)
        compiled = await self._run(_compile, policy, self.decision)
        settings = _breaker_settings(policy)
        self._compiled = compiled
        try:
            await smoke_test(self)
        except PolicyEvalError as exc:
            self._compiled = None
            raise PolicyLoadError(
                policy.modules[0][0], None, f"evaluating a sample input failed: {exc}"
            ) from exc
        self._breaker = settings
        return "; ".join(policy.warnings) or None

    async def evaluate(self, input: Mapping[str, Any]) -> dict[str, Decision]:
        compiled = self._compiled
        if compiled is None or self._executor is None:
            raise PolicyEvalError("embedded policy engine is not loaded")
        names = upstream_names(input)
        try:
            text = json.dumps(input, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PolicyEvalError(f"policy input is not valid JSON: {exc}") from exc
        raw = await self._run(_query, compiled, self.decision, text)
        return parse_decisions(raw, names, f"data.{self.decision.replace('/', '.')}")

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        self._compiled = None
        if executor is not None:
            # An evaluation still running finishes on its own references.
            executor.shutdown(wait=False)

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            raise PolicyEvalError("embedded policy engine is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)


def _lower_priority() -> None:
    """Worker thread: WORKER_NICE above the process' own niceness. Linux only,
    where a thread's id names it to setpriority; elsewhere that id would name
    a process."""
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICE)
    except OSError as exc:  # a seccomp profile may refuse it: the engine works all the same
        log.warning("policy worker keeps the loop's CPU priority", extra={"error": str(exc)})


def _compile(policy: files.PolicySet, decision: str) -> _Compiled:
    """Worker thread: build the bundle for the decision entry point."""
    interpreter = regopy.Interpreter()
    # Else rego-cpp prints its error report on the process' stdout.
    interpreter.log_level = regopy.LogLevel.NONE
    try:
        interpreter.add_data(policy.data)
        for name, source in policy.modules:
            interpreter.add_module(name, source)
        bundle = interpreter.build(None, [decision])
    except regopy.RegoError as exc:
        raise _load_error(str(exc), policy) from exc
    if not bundle.ok():
        raise PolicyLoadError(policy.modules[0][0], None, "rego-cpp could not build the policy")
    return _Compiled(interpreter, bundle, policy)


def _query(compiled: _Compiled, decision: str, text: str) -> Any:
    """Worker thread: one evaluation; returns the decision document."""
    where = f"data.{decision.replace('/', '.')}"
    try:
        compiled.interpreter.set_input_term(text)
        output = compiled.interpreter.query_bundle_entrypoint(compiled.bundle, decision)
    except regopy.RegoError as exc:
        raise PolicyEvalError(f"evaluating {where} failed: {_error_text(str(exc))}") from exc
    except json.JSONDecodeError as exc:
        # regopy's Output parses the result as JSON; an evaluation error (an
        # unknown function, a conflict) comes back as an error tree instead.
        raise PolicyEvalError(f"evaluating {where} failed: {_error_text(exc.doc)}") from exc
    if not output.ok():
        raise PolicyEvalError(f"evaluating {where} failed: {_output_error(output)}")
    results = output.results
    if not results or not results[0].expressions:
        raise PolicyEvalError(f"{where} is undefined (no rule produces it)")
    return results[0].expressions[0]


def _breaker_settings(policy: files.PolicySet) -> tuple[float, int]:
    raw: Any = policy.data
    for key in BREAKER_DATA_PATH:
        raw = raw.get(key) if isinstance(raw, dict) else None
    try:
        return parse_breaker_settings(raw)
    except ValueError as exc:
        where = policy.source_of(BREAKER_DATA_PATH) or "data.sidecar.config.breaker"
        raise PolicyLoadError(where, None, str(exc)) from exc


def _load_error(message: str, policy: files.PolicySet) -> PolicyLoadError:
    """A rego-cpp error tree -> PolicyLoadError at the first error's file and line."""
    sources = dict(policy.modules)
    for match in _ERROR_AT.finditer(message):
        name, offset = match.group(1), int(match.group(2))
        if name in sources:
            line = sources[name].encode()[:offset].count(b"\n") + 1
            return PolicyLoadError(name, line, _error_text(message[match.end() :]))
    return PolicyLoadError(policy.modules[0][0], None, _error_text(message))


def _output_error(output: Any) -> str:
    """The message of a failed regopy Output (its string form is just "<error>")."""
    try:
        node = output.node()  # an error sequence; iterating it yields unfetched Nones
        text = "".join(node.at(i).json() for i in range(len(node)))
    except Exception:  # only used to word an error: never mask the original one
        text = str(output)
    return _error_text(text)


def _error_text(tree: str) -> str:
    """The first ``errormsg`` of a rego-cpp error tree, or the text itself."""
    match = _ERROR_MSG.search(tree)
    if match is None:
        text = tree.strip()
        return text[:300] if text and text != "<error>" else "rego-cpp reported an error"
    length = int(match.group(1))
    return tree[match.end() : match.end() + length]
