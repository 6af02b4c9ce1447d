"""The scenarios of bench/resilience.py: what the primary does, and what load meets it.

A load scenario is a list of phases, each a primary mode (bench/faults.py)
held for a while, under one closed-loop load (bench/drive.py) that runs
through all of them. With three phases (healthy, fault, healthy) the second
is the fault and the third the heal: the harness reports the time from the
fault to the first trip and from the heal to every breaker closed again. A
build scenario runs the real go command (a cold ``go mod download`` of the
e2e corpus) and may SIGSTOP the primary before it or once it was asked a
number of requests (mid-build however fast the machine is).

Issue 13 (busy is not sick): healthy bursts, HEAD against a 405, sumdb-only
failures. Issue 14 (sick is caught fast): the fault matrix and the builds.
New scenarios are one more entry in ``SCENARIOS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.faults import MODES


@dataclass(frozen=True, slots=True)
class Phase:
    mode: str  # a key of bench.faults.MODES
    seconds: float
    quick_seconds: float

    def length(self, quick: bool) -> float:
        return self.quick_seconds if quick else self.seconds


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    issue: int
    what: str
    phases: tuple[Phase, ...] = ()
    clients: int = 8
    mix: str = "info"  # bench.drive.KINDS with weights
    pool: int | None = None  # pool limit (sidecar pool.max_connections, nginx max_conns)
    build: bool = False  # a real `go mod download` instead of the load client
    freeze_after: int | None = None  # build: SIGSTOP the primary after this many requests
    # to it (0: before the build)

    @property
    def faulted(self) -> bool:
        """Three phases: healthy, fault, healthy again."""
        return len(self.phases) == 3


def _one(mode: str) -> tuple[Phase, ...]:
    return (Phase(mode, 8, 3),)


def _fault(mode: str, seconds: float = 20, quick_seconds: float = 8) -> tuple[Phase, ...]:
    # The heal phase outlasts the default cool-down (30 s) plus probes, so the
    # return to closed is seen in a full run; --quick may end before it.
    return (
        Phase("healthy", 5, 2),
        Phase(mode, seconds, quick_seconds),
        Phase("healthy", 45, 20),
    )


BURSTS = tuple(
    Scenario(
        f"burst{clients}-pool{pool}",
        13,
        f"healthy primary ({MODES['healthy']}), {clients} clients asking unique .info, "
        f"pool limit {pool}",
        _one("healthy"),
        clients=clients,
        pool=pool,
    )
    for pool in (64, 8)
    for clients in (64, 256, 1024)
)

FAULT_MIX = "info:2,mod:1,list:1"
MID_BUILD = 10  # requests to the primary before it hangs; a healthy cold build asks ~40

SCENARIOS: tuple[Scenario, ...] = (
    *BURSTS,
    Scenario(
        "head405",
        13,
        "healthy Athens-like primary answering HEAD with 405; 1 request in 4 is a HEAD (curl -I)",
        _one("healthy"),
        clients=16,
        mix="info:3,head:1",
    ),
    Scenario(
        "sumdb502",
        13,
        f"primary: {MODES['sumdb502']}; half the requests are checksum-database lookups and tiles",
        _one("sumdb502"),
        clients=16,
        mix="info:2,lookup:1,tile:1",
    ),
    *(
        Scenario(
            mode,
            14,
            f"primary healthy, then {MODES[mode]}, then healthy again; 8 clients",
            _fault(mode),
            mix=FAULT_MIX,
        )
        for mode in ("hung", "slow", "error50", "error100", "reset", "masking")
    ),
    Scenario(
        "flapping",
        14,
        f"primary healthy, then {MODES['flapping']} for 40 s, then healthy again; 8 clients",
        _fault("flapping", 40, 20),
        mix=FAULT_MIX,
    ),
    Scenario(
        "overloaded",
        14,
        f"primary healthy, then {MODES['overloaded']}, then healthy again; 128 clients",
        _fault("overloaded"),
        clients=128,
    ),
    Scenario("build", 14, "cold `go mod download` of the e2e corpus, healthy primary", build=True),
    Scenario(
        "build-hung",
        14,
        "cold `go mod download`, primary SIGSTOP'ed (hung) before the build starts",
        build=True,
        freeze_after=0,
    ),
    Scenario(
        "build-hung-mid",
        14,
        f"cold `go mod download`, primary SIGSTOP'ed once it was asked {MID_BUILD} requests "
        "(of about 40)",
        build=True,
        freeze_after=MID_BUILD,
    ),
)

BY_NAME = {s.name: s for s in SCENARIOS}
