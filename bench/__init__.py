"""Benchmark harness of goproxy-sidecar: ``python3 bench/run.py`` (see bench/README.md)."""
