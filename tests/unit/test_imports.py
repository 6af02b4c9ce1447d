"""What a sidecar with the default (embedded) policy engine imports: the OPA
client's dependencies cost 16 MB of RSS and are not loaded unless asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
HEAVY = ("opa_client", "aiohttp", "requests", "urllib3")


def loaded_after(code: str) -> list[str]:
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    modules = set(json.loads(out.stdout.splitlines()[-1]))
    return [name for name in HEAVY if name in modules]


def test_the_embedded_engine_loads_no_opa_client() -> None:
    code = (
        "import sidecar.cli, sidecar.app, sidecar.runtime\n"  # what `run` imports
        "from sidecar.config import PolicyConfig\n"
        "from sidecar.policy import make_engine\n"
        "make_engine(PolicyConfig())\n"  # the default: embedded
    )
    assert loaded_after(code) == []


def test_the_opa_engine_loads_its_client() -> None:
    code = (
        "from sidecar.config import PolicyConfig, PolicyEngineKind\n"
        "from sidecar.policy import make_engine\n"
        "make_engine(PolicyConfig(engine=PolicyEngineKind.OPA))\n"
    )
    assert "opa_client" in loaded_after(code)
