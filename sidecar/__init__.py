"""goproxy-sidecar: a policy-driven circuit-breaker sidecar for Go module proxies."""

__version__ = "0.1.0"
