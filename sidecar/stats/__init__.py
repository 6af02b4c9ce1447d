"""Per-upstream sliding-window statistics and latency percentiles (pure, I/O-free)."""

from sidecar.stats.histogram import Histogram
from sidecar.stats.window import Outcome, SliceSnapshot, UpstreamWindow, WindowSnapshot

__all__ = ["Histogram", "Outcome", "SliceSnapshot", "UpstreamWindow", "WindowSnapshot"]
