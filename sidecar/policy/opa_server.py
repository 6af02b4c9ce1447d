"""The OPA-server engine: the same input sent to a real OPA with opa-python-client.

The policy lives in the OPA server (``opa run --server policies/``, or a
bundle); this engine only asks ``POST /v1/data/<policy.decision>``. Every
evaluation has a hard deadline (``timeout``, by default the smaller of the
policy interval and 2 s) and no retries: a late answer is worse than none,
since the caller keeps the last good decision anyway. An OPA that is down at
start-up does not stop the sidecar: ``load()`` returns a warning and each
evaluation fails until OPA answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from opa_client import AsyncOpaClient
from opa_client.errors import PolicyNotFoundError

from sidecar.breaker.state import Decision
from sidecar.errors import PolicyEvalError, PolicyLoadError
from sidecar.policy.base import (
    BREAKER_DATA_PATH,
    MAX_TIMEOUT_S,
    PolicyEngine,
    parse_breaker_settings,
    parse_decisions,
    upstream_names,
)


class OpaServerEngine(PolicyEngine):
    """Asks a running OPA server for the decision."""

    def __init__(self, url: str, decision: str, timeout: float = MAX_TIMEOUT_S) -> None:
        super().__init__(decision)
        self.url = url
        self.timeout = timeout
        self._client: AsyncOpaClient | None = None
        self._settings_known = False

    @property
    def name(self) -> str:
        return "opa"

    @property
    def _where(self) -> str:
        return f"{self.url}/v1/data/{self.decision}"

    async def load(self) -> str | None:
        if self._client is None:
            self._client = await self._connect()
        try:
            await self._with_deadline(self._client.get_data(self.decision))
        except PolicyNotFoundError as exc:
            raise PolicyLoadError(
                self._where,
                None,
                f"not defined on the OPA server ({exc.message}): load "
                "the policy there, e.g. opa run --server policies/",
            ) from exc
        except Exception as exc:  # unreachable, timeout, garbage: serve anyway
            return (
                f"OPA server at {self.url} is not usable yet ({_describe(exc)}); "
                "policy evaluations fail until it answers"
            )
        await self._refresh_breaker_settings()
        return None

    async def evaluate(self, input: Mapping[str, Any]) -> dict[str, Decision]:
        names = upstream_names(input)
        client = self._client
        if client is None:
            raise PolicyEvalError("OPA policy engine is not loaded")
        try:
            body = await self._with_deadline(client.query_rule(dict(input), self.decision))
        except Exception as exc:
            raise PolicyEvalError(f"asking {self._where} failed: {_describe(exc)}") from exc
        if not isinstance(body, dict) or "result" not in body:
            raise PolicyEvalError(f"{self._where} is undefined on the OPA server")
        decisions = parse_decisions(body["result"], names, self._where)
        if not self._settings_known:
            await self._refresh_breaker_settings()
        return decisions

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close_connection()

    async def _connect(self) -> AsyncOpaClient:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyLoadError(self.url, None, "policy.opa_url must be http(s)://host:port")
        if parts.path not in ("", "/"):
            raise PolicyLoadError(self.url, None, "policy.opa_url cannot have a path")
        https = parts.scheme == "https"
        client = AsyncOpaClient(
            host=parts.hostname,
            port=parts.port or (443 if https else 80),
            ssl=https,
            retries=0,
            timeout=self.timeout,
        )
        await client.__aenter__()
        return client

    async def _refresh_breaker_settings(self) -> None:
        """Read data.sidecar.config.breaker once; absent or bad: the defaults stay."""
        if self._client is None:
            return
        try:
            body = await self._with_deadline(self._client.get_data("/".join(BREAKER_DATA_PATH)))
            self._breaker = parse_breaker_settings(body.get("result"))
        except (PolicyNotFoundError, ValueError):
            pass  # not defined or not valid: the defaults stay
        except Exception:
            return  # try again after the next good evaluation
        self._settings_known = True

    async def _with_deadline(self, call: Any) -> Any:
        # Not wait_for: on 3.11 it can swallow a racing cancellation.
        async with asyncio.timeout(self.timeout):
            return await call


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or getattr(exc, "message", "") or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
