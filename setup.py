"""Build: the per-request modules (sidecar/compiled.py) compiled with mypyc.

``GOPROXY_SIDECAR_PURE=1 pip install .`` installs them as plain Python. Without
a C compiler the build warns and installs them as plain Python too (each
extension is optional): the sidecar works either way, about twice as slow per
small request.
"""

import os
import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LISTING = runpy.run_path(str(ROOT / "sidecar" / "compiled.py"))


def extensions() -> list:
    if os.environ.get("GOPROXY_SIDECAR_PURE", "") not in ("", "0"):
        return []
    from mypyc.build import mypycify

    # pip builds in an environment without the runtime dependencies: their
    # types are Any there, which strict mode (pyproject.toml) would refuse.
    relaxed = ["--allow-subclassing-any", "--no-warn-return-any", "--no-warn-unused-ignores"]
    # Two libraries, which build_ext compiles in parallel: each carries its own
    # copy of mypyc's runtime, and each mapped library adds to RSS. Measured at
    # start-up: one per module +12.4 MB RSS over plain Python (2.2 min to build
    # on 2 cores), one in all +2.3 MB (5 min), two +3.3 MB (2.0 min).
    compiled = list(LISTING["COMPILED"])
    half = len(compiled) // 2
    groups = [(compiled[:half], "sidecar_request"), (compiled[half:], "sidecar_store")]
    built = mypycify([*relaxed, *compiled], opt_level="3", separate=groups)
    for ext in built:
        ext.optional = True
    return built


class BuildExt(build_ext):
    """An in-place build (``pip install -e .``) notes what it compiled, so that
    the tests can refuse a build older than its sources."""

    def run(self) -> None:
        super().run()
        if self.inplace or self.editable_mode:
            LISTING["write_stamp"](ROOT)


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    options={"build_ext": {"parallel": os.cpu_count() or 1}},
)
