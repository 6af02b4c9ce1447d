"""The embedded engine keeps no memory per evaluation when the sidecar is
imported the way its entry points import it (see sidecar.native)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.tools import missing

EVALUATIONS = 300
# Evaluated like the control loop does: a fresh build_input() every time.
SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    {first}
    import asyncio
    import sidecar
    from sidecar.app import build_sidecar
    from sidecar.config import CacheConfig, Config, PolicyConfig, UpstreamConfig
    from sidecar.control import build_input
    from sidecar.policy import make_engine

    def rss_kb():
        gc.collect()
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

    async def main():
        config = Config(
            listen="127.0.0.1:0",
            upstreams=(
                UpstreamConfig(name="athens", url="http://127.0.0.1:1"),
                UpstreamConfig(name="public", url="http://127.0.0.1:2"),
            ),
            cache=CacheConfig(dir="unused", enabled=False),
            policy=PolicyConfig(),
        )
        sc = build_sidecar(config)
        engine = make_engine(config.policy)
        await engine.load()
        for _ in range(50):  # warm-up: first evaluations allocate for good
            await engine.evaluate(build_input(sc))
        before = rss_kb()
        for _ in range({n}):
            await engine.evaluate(build_input(sc))
        after = rss_kb()
        print(json.dumps({{"late": sidecar.REGOPY_LOADED_LATE, "kb": after - before}}))

    asyncio.run(main())
    """
)


def _grow(first: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(first=first, n=EVALUATIONS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_embedded_engine_keeps_no_memory_per_evaluation() -> None:
    if not sys.platform.startswith("linux"):
        missing("reads /proc/self: Linux only")
    fixed = _grow("")
    # The reference: aiohttp (and with it the C++ runtime) loaded first, the
    # order that leaked. It shows the measurement can see the leak.
    leaking = _grow("import aiohttp")
    assert fixed["late"] is False
    assert leaking["late"] is True
    per_eval_fixed = float(fixed["kb"]) / EVALUATIONS  # type: ignore[arg-type]
    per_eval_leaking = float(leaking["kb"]) / EVALUATIONS  # type: ignore[arg-type]
    assert per_eval_leaking > 10, leaking
    assert per_eval_fixed < 2, (fixed, leaking)
