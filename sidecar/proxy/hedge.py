"""Hedged requests: the same GET to the next allowed upstream when the first is slow.

The idea is "The Tail at Scale" (Dean and Barroso, 2013) and Envoy's
``hedge_policy``: a request whose upstream has sent no response headers
within the *hedge delay* is sent again, to the next upstream its route
allows; the first good answer is served and the other attempt is cancelled
(its connection closed). A hung upstream then costs a client the delay, not
``timeouts.first_byte``.

Which answer wins follows the GOPROXY list, as the walk does:

- the hedge answers 200 while the first upstream still waits: the hedge's
  answer is served and the first attempt is cancelled;
- the first upstream answers 200 (its headers reached the handler first):
  it is served and the hedge is cancelled;
- the first upstream answers 404/410 or fails: the hedge's answer
  is what the next upstream of the list says (a 200 makes the 404 a masked
  failure), and the walk goes on after it.

The hedge target is the first later target of the request's route whose
breaker allows traffic now, so routing holds exactly as for a reroute: a
private module is only ever hedged to a ``private_ok`` upstream. One hedge
per request at most; a half-open breaker's probe may be hedged (its verdict
is then "none" if the hedge won, see the handler).

Delay (``hedge.delay``, per upstream and traffic class): a fixed duration,
or ``auto``: the upstream's own TTFB p95 over the statistics window, at least
``hedge.floor`` and at most ``timeouts.first_byte / CAP_DIVISOR``; with fewer
than ``MIN_REQUESTS`` requests in the window (a fresh start, or a breaker
transition that restarted the window) the floor. Once learned, the delay
follows a falling p95 at once but a rising one by at most ``RISE`` per
control tick: an upstream turning slow (every answer 1.5 s late) would
otherwise teach the delay its own sickness within seconds, and its hedges
would fire when its answers come anyway, while the policy still needs its
span to judge it. The clock starts when the
request is admitted (``Upstream.open``'s ``admitted``): the sidecar's own
queue is admission's business (overflow), never a reason to hedge.

An upstream that has said nothing since one of its requests lost its race
(a hedge answered it while it waited) is hedged at once, without a token:
a hung upstream then costs one delay per silence, not one per request, in
the second or so the policy needs to see it stalled (``stall_hedged_ms``).
Such a hedge is a reroute that keeps a chance for the first answer, not a
speculative copy: the next upstream gets each request once, as it will
when the breaker opens, and the budget stays for the next silence. Its
first answer ends the silence, and with it the haste.

Budget (``hedge.budget``, ``hedge.burst``): a token bucket per upstream and
traffic class, so a slow upstream cannot double the load on the next one.
Each admitted request adds ``budget`` tokens (at most ``burst``), a hedge
takes one; the bucket starts full. Over a long run at most ``budget`` of the
requests are hedged, plus ``burst``. A request that finds the bucket empty
keeps waiting (``result="budget_exhausted"``).

A breaker that opens moves the requests still waiting on its upstream at
once (``Hedging.plan_changed``, called with every new plan): each is hedged
now, without a token. The policy has judged the upstream sick, so these are
reroutes of requests already in flight, not speculative copies.

Mechanics, chosen for the hot path. A miss on a healthy upstream pays no
task and, while requests keep coming, no timer of its own: the first
attempt is awaited in the request's own task, and each lane keeps its
armed requests in arrival order behind one timer, set for the oldest
deadline (``Lane.schedule``); a request that got its headers is only
flagged, and dropped when its deadline comes by. Measured in-process, a
race costs about 3 µs this way and 6 µs with a loop timer of its own (a
proxied miss costs about 200 µs). When the delay passes, the hedge starts
as a task; if its 200 arrives while the first attempt still waits, it
cancels the request's task, which stops the first attempt where it waits
(its connection is closed, its admission slot freed) and
``Race.took_over`` tells that cancellation apart from a client leaving
(``Task.uncancel``, as ``asyncio.timeout`` does).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

from sidecar.breaker.machine import Breaker
from sidecar.breaker.plan import UpstreamPlan
from sidecar.breaker.state import Action, State, TrafficClass
from sidecar.config import UpstreamConfig
from sidecar.metrics import Metrics
from sidecar.stats.window import UpstreamWindow

if TYPE_CHECKING:
    from sidecar.upstreams import Upstream, UpstreamResponse

# The hedge fires no later than first_byte / 5 (3 s of the default 15 s): a
# hung first attempt then still leaves the hedge four fifths of the timeout
# for its own answer, and saves the client at least 12 s.
CAP_DIVISOR: Final = 5.0
# A p95 of fewer requests is the largest of a handful: noise. 20 is also the
# default policy's min_requests.
MIN_REQUESTS: Final = 20
# How fast a learned delay may grow, per control tick (1 s by default): about
# doubling in 7 s, so a lasting change is followed within half a minute.
RISE: Final = 1.1


class Lane:
    """Hedging of one upstream's traffic of one class (one breaker): its delay,
    its budget and the requests waiting on it now."""

    __slots__ = (
        "_delay_gauge",
        "_due",
        "_exhausted",
        "_lost",
        "_timer",
        "_window",
        "_won",
        "breaker",
        "burst",
        "cap",
        "delay",
        "enabled",
        "fixed",
        "floor",
        "learned",
        "name",
        "rate",
        "tokens",
        "waiting",
    )

    def __init__(
        self,
        cfg: UpstreamConfig,
        klass: TrafficClass,
        breaker: Breaker,
        window: UpstreamWindow,
        metrics: Metrics,
    ) -> None:
        hedge = cfg.hedge
        self.name = cfg.name
        self.breaker = breaker
        self.enabled = hedge.enabled
        self.fixed = hedge.delay
        self.floor = hedge.floor
        self.cap = max(hedge.floor, cfg.timeouts.first_byte / CAP_DIVISOR)
        self.delay = hedge.floor if hedge.delay is None else hedge.delay
        self.learned = False  # the delay is a p95 (not the floor of no statistics)
        self.rate = hedge.budget
        self.burst = float(hedge.burst)
        self.tokens = self.burst if hedge.budget > 0 else 0.0
        self.waiting: set[Race] = set()  # armed and not stopped: a breaker opening moves them
        # Armed races by deadline, oldest first (stopped ones too, until their
        # deadline: bounded by the requests of one delay), and the one timer.
        self._due: deque[tuple[float, Race]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._window = window
        hedges = metrics.hedges
        self._won = hedges.labels(cfg.name, "won").inc
        self._lost = hedges.labels(cfg.name, "lost").inc
        self._exhausted = hedges.labels(cfg.name, "budget_exhausted").inc
        self._delay_gauge = metrics.hedge_delay.labels(cfg.name, klass.value)
        self._delay_gauge.set(self.delay)

    def credit(self) -> None:
        """One more request admitted: ``rate`` more tokens, at most ``burst``."""
        tokens = self.tokens + self.rate
        self.tokens = tokens if tokens < self.burst else self.burst

    def schedule(self, race: Race) -> None:
        """``race`` is due for its hedge one delay from now, or at once while
        this upstream is silent and has already lost a race of that silence:
        see the module docstring."""
        loop = asyncio.get_running_loop()
        if self._window.inflight.overtaken:
            loop.call_soon(race.fire, True)
            return
        due = loop.time() + self.delay
        self._due.append((due, race))
        if self._timer is None:
            self._timer = loop.call_at(due, self._expire)

    def _expire(self) -> None:
        """Hedge every race whose deadline passed (stopped ones are skipped).
        After ``learn`` shortened the delay, a newer race may be due before an
        older one: it then fires when the older one does, at most the change late."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = self._due
        while due and due[0][0] <= now:
            due.popleft()[1].fire(False)
        if due:
            self._timer = loop.call_at(due[0][0], self._expire)

    def take(self) -> bool:
        """A token for one hedge, if the bucket has one (counted when not)."""
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self._exhausted()
        return False

    def learn(self, ttfb_p95_ms: float, requests: int) -> None:
        """A new statistics snapshot of this upstream and class (every control tick)."""
        if self.fixed is not None:
            return
        if requests < MIN_REQUESTS:
            self.delay, self.learned = self.floor, False
        else:
            delay = min(self.cap, max(self.floor, ttfb_p95_ms / 1000.0))
            if self.learned and delay > self.delay * RISE:
                delay = self.delay * RISE
            self.delay, self.learned = delay, True
        self._delay_gauge.set(self.delay)

    def resolved(self, won: bool, overtaken: bool) -> None:
        """A hedge sent away from this upstream is over (``overtaken``: its 200
        cancelled the attempt still waiting here)."""
        (self._won if won else self._lost)()
        self._window.record_hedge(won, overtaken)


class Hedging:
    """Every lane of a sidecar: one per upstream and traffic class, by breaker."""

    def __init__(
        self,
        upstreams: Mapping[str, Upstream],
        breakers: Mapping[TrafficClass, Mapping[str, Breaker]],
        windows: Mapping[TrafficClass, Mapping[str, UpstreamWindow]],
        metrics: Metrics,
    ) -> None:
        self.upstreams = upstreams
        self._lanes: dict[Breaker, Lane] = {}
        for up in upstreams.values():
            for klass, by_name in breakers.items():
                breaker = by_name[up.name]
                lane = Lane(up.cfg, klass, breaker, windows[klass][up.name], metrics)
                self._lanes[breaker] = lane

    def lane(self, breaker: Breaker) -> Lane:
        return self._lanes[breaker]

    def race(self, first: UpstreamPlan, path: str, targets: Sequence[UpstreamPlan]) -> Race | None:
        """A race for one request to ``first``, or None: hedging is off for it.
        ``targets``: the request's route, in walk order (``first`` among them)."""
        lane = self._lanes[first.breaker]
        if not lane.enabled or len(targets) < 2:
            return None
        return Race(self, lane, first, path, targets)

    def learn(self, breaker: Breaker, ttfb_p95_ms: float, requests: int) -> None:
        self._lanes[breaker].learn(ttfb_p95_ms, requests)

    def plan_changed(self) -> None:
        """Requests still waiting on an upstream whose breaker is now open are
        hedged at once (a new plan is published on every transition)."""
        for lane in self._lanes.values():
            if lane.waiting and lane.breaker.state is State.OPEN:
                for race in list(lane.waiting):
                    race.fire(True)


class Race:
    """One request's first attempt and, maybe, its hedge. See the module docstring.

    The handler calls ``arm`` (as ``Upstream.open``'s ``admitted``), ``stop``
    as soon as the first attempt's await ends, ``took_over`` when that await
    was cancelled, then ``winner`` or ``outcome``, and ``close`` at the end.
    """

    __slots__ = (
        "_baseline",
        "_hedging",
        "_taken",
        "_task",
        "_waiting",
        "_won",
        "first",
        "hedge",
        "hedge_name",
        "lane",
        "path",
        "targets",
    )

    def __init__(
        self,
        hedging: Hedging,
        lane: Lane,
        first: UpstreamPlan,
        path: str,
        targets: Sequence[UpstreamPlan],
    ) -> None:
        self._hedging = hedging
        self.lane = lane
        self.first = first
        self.path = path
        self.targets = targets
        self.hedge: asyncio.Task[UpstreamResponse] | None = None
        self.hedge_name = ""
        self._task: asyncio.Task[object] | None = None
        self._waiting = False
        self._won = False
        self._baseline = 0
        self._taken = False

    def arm(self) -> None:
        """The first attempt was admitted: the delay starts now."""
        lane = self.lane
        lane.credit()
        self._task = asyncio.current_task()
        self._waiting = True
        lane.waiting.add(self)
        lane.schedule(self)

    def stop(self) -> None:
        """The first attempt's await is over (headers, failure or cancel): no
        hedge starts after this, and a hedge's answer cancels nothing."""
        if self._waiting:
            self._waiting = False
            self.lane.waiting.discard(self)

    def fire(self, forced: bool) -> None:
        """Start the hedge (the delay passed, or ``forced``: the breaker opened,
        or the upstream is silent and lost a race already; no token then)."""
        if not self._waiting or self.hedge is not None:
            return
        target = self._target()
        if target is None or not (forced or self.lane.take()):
            return
        upstream = self._hedging.upstreams[target.name]
        self.hedge_name = target.name
        self.hedge = asyncio.get_running_loop().create_task(upstream.open(self.path))
        self.hedge.add_done_callback(self._hedge_done)

    def _target(self) -> UpstreamPlan | None:
        """The first later target of the route whose breaker allows traffic now."""
        later = False
        for target in self.targets:
            if later:
                if target.action is Action.ALLOW and target.breaker.state is not State.OPEN:
                    return target
            elif target is self.first:
                later = True
        return None

    def _hedge_done(self, hedge: asyncio.Task[UpstreamResponse]) -> None:
        if hedge.cancelled() or hedge.exception() is not None:
            return  # the handler reads a failure when the first attempt has no answer
        if self._waiting and hedge.result().status == 200 and self._task is not None:
            self._won = True
            self._baseline = self._task.cancelling()
            self._task.cancel()
            self.stop()

    def took_over(self) -> bool:
        """True if the first attempt was cancelled by the hedge's 200 alone (not
        also by the client leaving: then the cancellation goes on)."""
        if not self._won or self._task is None:
            return False
        return self._task.uncancel() <= self._baseline

    def winner(self) -> UpstreamResponse:
        """The hedge's 200 that took over."""
        assert self.hedge is not None
        self._taken = True
        return self.hedge.result()

    async def outcome(self) -> UpstreamResponse:
        """The hedge's answer, for a first attempt that had none (raises its failure)."""
        assert self.hedge is not None
        self._taken = True
        return await self.hedge

    def close(self, won: bool) -> UpstreamResponse | BaseException | None:
        """The race is over (``won``: the hedge's answer is served). A hedge still
        running is cancelled; one that ended unused is returned for the
        record (its response not yet released)."""
        self.stop()
        hedge = self.hedge
        # The lane's queue may hold this race until its deadline: keep it small.
        self._task, self.hedge, self.targets = None, None, ()
        if hedge is None:
            return None
        self.lane.resolved(won, self._won)
        if self._taken:
            return None
        self._taken = True
        if not hedge.done():
            hedge.cancel()
            return None
        if hedge.cancelled():
            return None
        exc = hedge.exception()
        return exc if exc is not None else hedge.result()
