"""goproxy-sidecar: a policy-driven circuit-breaker sidecar for Go module proxies."""

from sidecar.native import load_regopy_first

__version__ = "0.1.0"

# Before anything imports aiohttp (see sidecar.native): one line that keeps
# the embedded policy engine from leaking ~45 KB per evaluation.
REGOPY_LOADED_LATE = load_regopy_first()
