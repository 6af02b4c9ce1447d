"""Inline SVG sparklines for the status page: one small chart per series.

Server-rendered so the page needs no script and no asset: a polyline over
the window's slices, oldest on the left, scaled to the series' own maximum
(a sparkline shows a shape; the number beside it gives the scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Final

WIDTH: Final = 100
HEIGHT: Final = 20
PAD: Final = 2  # keeps the stroke of a flat line at 0 or at the maximum inside the box


def sparkline(values: Sequence[float], label: str, unit: str = "") -> str:
    """An ``<svg>`` of ``values`` (oldest first); its ``<title>`` names the
    figures so a hover or a screen reader gets them without the drawing."""
    title = escape(f"{label}: " + _summary(values, unit))
    head = (
        f'<svg class="spark" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{title}"><title>{title}</title>'
    )
    if not values:
        mid = HEIGHT // 2
        return f'{head}<line x1="0" y1="{mid}" x2="{WIDTH}" y2="{mid}" class="empty"/></svg>'
    top = max(values)
    span = HEIGHT - 2 * PAD
    step = (WIDTH - 2 * PAD) / max(1, len(values) - 1)

    def y(v: float) -> float:
        return HEIGHT - PAD - (v / top * span if top > 0 else 0.0)

    points = [(PAD + i * step, y(v)) for i, v in enumerate(values)]
    if len(points) == 1:  # one slice: a short level line, not an invisible point
        points.append((WIDTH - PAD, points[0][1]))
    line = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
    area = f"{PAD},{HEIGHT - PAD} {line} {points[-1][0]:.1f},{HEIGHT - PAD}"
    return (
        f'{head}<polygon points="{area}" class="area"/>'
        f'<polyline points="{line}" class="line"/></svg>'
    )


def _summary(values: Sequence[float], unit: str) -> str:
    if not values:
        return "no data yet"
    return f"last {_fmt(values[-1])}{unit}, max {_fmt(max(values))}{unit} over {len(values)} slices"


def _fmt(x: float) -> str:
    return f"{x:.0f}" if x >= 100 or float(x).is_integer() else f"{x:.2f}"
