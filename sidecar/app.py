"""Builds every part from a Config and owns start-up and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial

from sidecar.auth.gate import FrontDoor
from sidecar.auth.reloader import CredentialReloader, open_door
from sidecar.breaker.machine import Breaker
from sidecar.breaker.plan import Plan
from sidecar.breaker.state import Decision, State, TrafficClass
from sidecar.cache.base import ModuleCache
from sidecar.compiled import running_compiled
from sidecar.config import Config, VerifyMode
from sidecar.control import (
    RECENT_TRANSITIONS,
    ControlLoop,
    RecentTransition,
    breakers_of,
    on_transition,
    windows_of,
)
from sidecar.endpoints import endpoints
from sidecar.front import Front
from sidecar.metrics import Metrics
from sidecar.policy import make_engine
from sidecar.policy.base import PolicyEngine
from sidecar.policy.reloader import PolicyReloader
from sidecar.proxy.handler import ProxyHandler
from sidecar.proxy.hedge import Hedging
from sidecar.proxy.integrity import IntegrityChecker
from sidecar.proxy.internal import direct_fetch, handler_fetch
from sidecar.proxy.recorder import Recorder, queue_wait_sink
from sidecar.routing import Router
from sidecar.server import Server
from sidecar.server.tls import ListenerTls
from sidecar.stats.window import Clock, UpstreamWindow
from sidecar.upstreams import Upstream

log = logging.getLogger("sidecar.app")

MIN_POLICY_POLL_S = 1.0


@dataclass
class Sidecar:
    """Everything one running sidecar owns. ``plan`` is the only thing swapped."""

    config: Config
    metrics: Metrics
    upstreams: dict[str, Upstream]
    windows: dict[str, UpstreamWindow]  # module traffic
    breakers: dict[str, Breaker] = field(default_factory=dict)  # module traffic
    sumdb_windows: dict[str, UpstreamWindow] = field(default_factory=dict)  # checksum traffic
    sumdb_breakers: dict[str, Breaker] = field(default_factory=dict)  # checksum traffic
    cache: ModuleCache | None = None
    router: Router | None = None
    control: ControlLoop | None = None
    policy: PolicyReloader | None = None
    hedging: Hedging | None = None
    would: dict[str, Decision] = field(default_factory=dict)
    transitions: deque[RecentTransition] = field(
        default_factory=lambda: deque(maxlen=RECENT_TRANSITIONS)
    )
    background: set[asyncio.Task[object]] = field(default_factory=set)
    plan: Plan = field(init=False)
    _plan_version: int = 0

    def __post_init__(self) -> None:
        self.swap_plan()

    def swap_plan(self) -> None:
        """Publish the breakers' current actions; one assignment, so requests see
        either the old plan or the new one, never a mix."""
        self._plan_version += 1
        self.plan = Plan.from_breakers(
            self.breakers.values(),
            self.sumdb_breakers.values(),
            self._plan_version,
            time.monotonic(),
        )
        if self.hedging is not None:
            self.hedging.plan_changed()  # requests waiting on a breaker that opened move now

    def current_plan(self) -> Plan:
        return self.plan

    def cache_summary(self) -> dict[str, object]:
        if self.cache is None:
            return {"enabled": False, "entries": 0, "bytes": 0}
        return {"enabled": True, **self.cache.summary()}


def build_sidecar(
    config: Config, metrics: Metrics | None = None, clock: Clock = time.monotonic
) -> Sidecar:
    """Every part, wired; ``clock`` (windows and breakers) is for tests."""
    metrics = metrics or Metrics()
    upstreams: dict[str, Upstream] = {}
    for index, cfg in enumerate(config.upstreams):
        upstreams[cfg.name] = Upstream(cfg, "primary" if index == 0 else "backup")

    def window() -> UpstreamWindow:
        return UpstreamWindow(config.stats.window, config.stats.slice, clock)

    windows = {name: window() for name in upstreams}
    sumdb_windows = {name: window() for name in upstreams}
    for name, up in upstreams.items():
        up.admission.on_wait = queue_wait_sink(
            windows[name], metrics.upstream_queue_wait.labels(name)
        )
        up.inflight = windows[name].inflight
        up.sumdb_inflight = sumdb_windows[name].inflight
    sidecar = Sidecar(
        config,
        metrics,
        upstreams,
        windows,
        sumdb_windows=sumdb_windows,
        router=Router(config),
    )
    if config.cache.enabled:
        from sidecar.cache.store import DiskCache

        sidecar.cache = DiskCache(config.cache, metrics)
    for klass in TrafficClass:
        for name in upstreams:
            breaker = Breaker(name, clock, partial(on_transition, sidecar, klass))
            breakers_of(sidecar, klass)[name] = breaker
            for state in State:
                closed = state is State.CLOSED
                metrics.breaker_state.labels(name, klass.value, state.value).set(closed)
    sidecar.hedging = Hedging(
        upstreams,
        {klass: breakers_of(sidecar, klass) for klass in TrafficClass},
        {klass: windows_of(sidecar, klass) for klass in TrafficClass},
        metrics,
    )
    sidecar.swap_plan()
    return sidecar


class SidecarService:
    """A sidecar at work: its parts started, the control loop running, the HTTP
    server answering the proxy and the endpoints on one port.

    ``run_control=False`` leaves stepping the control loop to the caller
    (tests drive it tick by tick)."""

    def __init__(self, sidecar: Sidecar, run_control: bool = True) -> None:
        self.sidecar = sidecar
        self.run_control = run_control
        assert sidecar.router is not None
        recorder = Recorder(sidecar.metrics, sidecar.windows, sidecar.sumdb_windows)
        self.proxy = ProxyHandler(
            sidecar.upstreams,
            sidecar.current_plan,
            recorder,
            sidecar.cache,
            sidecar.config.policy.reject_status,
            sidecar.router,
            hedging=sidecar.hedging,
        )
        self.front = Front(self.proxy, endpoints(sidecar))
        self._sumdb_upstream: Upstream | None = None
        verify = sidecar.config.verify
        if verify.mode is not VerifyMode.OFF:
            if verify.url is not None:
                fetch, self._sumdb_upstream = direct_fetch(verify.url, verify.name)
            else:  # through this sidecar's own sumdb/<name>/ path: routed, judged, cached
                fetch = handler_fetch(self.front.internal)
            self.proxy.checker = IntegrityChecker(sidecar.config, recorder, fetch)
        self.server = Server(
            self.front.handle, self.front.answer_now, send_timeout_s=sidecar.config.send_timeout
        )
        self._control_task: asyncio.Task[None] | None = None
        self._started = False
        # Client authentication (client_auth), opened by start(): it reads files.
        self._credentials: CredentialReloader | None = None
        self.tls: ListenerTls | None = None  # HTTPS (tls), opened by start(): it reads files

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def door(self) -> FrontDoor | None:
        return self.front.door

    async def start(
        self, host: str | None = None, port: int | None = None, sock: socket.socket | None = None
    ) -> None:
        """Start every part, then listen on ``host:port`` (or ``sock``)."""
        self._started = True
        client_auth = self.sidecar.config.client_auth
        if client_auth.enabled:
            door, reloader = await asyncio.to_thread(open_door, client_auth, self.sidecar.metrics)
            self.front.door = self.proxy.door = door
            self.front.needs = {path: door.endpoint_need(path) for path in self.front.endpoints}
            self._credentials = reloader
            reloader.start_polling()
        if self.sidecar.config.tls.enabled:
            tls = self.sidecar.config.tls
            self.tls = await asyncio.to_thread(ListenerTls, tls, self.sidecar.metrics)
            self.server.tls = self.tls.listener
            self.tls.start_polling()
        await _start(self.sidecar)
        if self._sumdb_upstream is not None:
            await self._sumdb_upstream.start()
        control = self.sidecar.control
        if self.run_control and control is not None:
            self._control_task = asyncio.create_task(control.run(), name="control-loop")
        await self.server.listen(host, port, sock)

    async def stop(self, grace: float) -> None:
        """Stop listening, let requests in progress end within ``grace``, stop every part."""
        if not self._started:
            return
        self._started = False
        await self.server.close(grace)
        task, self._control_task = self._control_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.sidecar.control is not None:
            await self.sidecar.control.close()
        await _stop(self.sidecar)
        if self._sumdb_upstream is not None:
            await self._sumdb_upstream.close()
        if self._credentials is not None:
            await self._credentials.stop_polling()
        if self.door is not None:
            self.door.close()
        if self.tls is not None:
            await self.tls.stop_polling()

    def reload_credentials(self) -> None:
        """SIGHUP: reread the client credential files now."""
        if self._credentials is not None:
            log.info("SIGHUP: reloading client credentials")
            task = asyncio.get_running_loop().create_task(self._credentials.reload_now())
            self.sidecar.background.add(task)
            task.add_done_callback(self.sidecar.background.discard)

    def reload_tls(self) -> None:
        """SIGHUP: reload the listener's certificate and key now."""
        if self.tls is not None:
            log.info("SIGHUP: reloading the TLS certificate")
            task = asyncio.get_running_loop().create_task(self.tls.reload_now())
            self.sidecar.background.add(task)
            task.add_done_callback(self.sidecar.background.discard)


async def _start(sidecar: Sidecar) -> None:
    for upstream in sidecar.upstreams.values():
        await upstream.start()
    if sidecar.cache is not None:
        await sidecar.cache.start()
    policy_cfg = sidecar.config.policy
    sidecar.policy = PolicyReloader(
        lambda: make_engine(policy_cfg),
        policy_cfg.paths,
        poll_interval=max(policy_cfg.interval, MIN_POLICY_POLL_S),
        on_reload=lambda ok, error: _log_reload(ok, error),
        metrics=sidecar.metrics,
    )
    await sidecar.policy.start()
    sidecar.control = ControlLoop(sidecar, lambda: _engine(sidecar))


def _engine(sidecar: Sidecar) -> PolicyEngine:
    assert sidecar.policy is not None
    return sidecar.policy.engine


def _log_reload(ok: bool, error: str | None) -> None:
    if ok:
        log.info("policy reloaded")
    else:
        log.error("policy reload refused; the last good policy stays", extra={"error": error})


async def _stop(sidecar: Sidecar) -> None:
    if sidecar.policy is not None:
        await sidecar.policy.close()
    if sidecar.cache is not None:
        await sidecar.cache.stop()  # before the upstreams: fills read from their sessions
    for upstream in sidecar.upstreams.values():
        await upstream.close()


def _reload_on_hup(service: SidecarService) -> None:
    service.reload_credentials()
    service.reload_tls()
    sidecar = service.sidecar
    if sidecar.policy is not None:
        log.info("SIGHUP: reloading policy")
        task = asyncio.get_running_loop().create_task(sidecar.policy.reload_now())
        sidecar.background.add(task)
        task.add_done_callback(sidecar.background.discard)


async def serve(config: Config, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight requests within the grace."""
    service = SidecarService(build_sidecar(config))
    try:
        await service.start(config.host, config.port)
    except BaseException:
        await service.stop(0)
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload_on_hup(service))
    log.info(
        "listening",
        extra={
            "listen": config.listen,
            "https": config.tls.enabled,
            "upstreams": list(service.sidecar.upstreams),
            # "58/58"; fewer when the install had no C compiler (README Troubleshooting)
            "compiled": "{}/{}".format(*running_compiled()),
        },
    )
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down", extra={"grace_s": config.shutdown_grace})
    await service.stop(config.shutdown_grace)
