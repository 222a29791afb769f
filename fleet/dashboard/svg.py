"""Charts drawn on the server as inline SVG: line and step charts, sparklines, stacked bars.

Pure functions from numbers to markup (no I/O, no JavaScript, nothing fetched). Every piece
of text that reaches the markup is escaped here; colours come from CSS classes
(``series-0``, ``series-1``, ...) so the stylesheet decides them and the Content-Security-
Policy needs no inline styles. A value of ``None`` breaks a line (a gap in the data).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape

from markupsafe import Markup

__all__ = [
    "Segment",
    "Series",
    "line_chart",
    "nice_ticks",
    "sparkline",
    "stacked_bar",
]

Point = tuple[float, float | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Series:
    """One line: (x, y) points in x order; ``css`` picks its colour class."""

    name: str
    points: Sequence[Point]
    css: str = ""
    dashed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    """One part of a stacked bar."""

    label: str
    value: float
    css: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Frame:
    width: float
    height: float
    left: float = 44.0
    right: float = 8.0
    top: float = 8.0
    bottom: float = 20.0
    x0: float = 0.0
    x1: float = 1.0
    y0: float = 0.0
    y1: float = 1.0
    extra: dict[str, float] = field(default_factory=dict)

    def x(self, v: float) -> float:
        span = self.x1 - self.x0 or 1.0
        return self.left + (v - self.x0) / span * (self.width - self.left - self.right)

    def y(self, v: float) -> float:
        span = self.y1 - self.y0 or 1.0
        return (
            self.height
            - self.bottom
            - (v - self.y0) / span * (self.height - self.top - self.bottom)
        )


def nice_ticks(lo: float, hi: float, count: int = 4, *, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 5 x 10^n steps; at least 1 if integer)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, float(math.ceil(step)))
    first = math.floor(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 12))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


def _time_label(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=UTC).strftime("%H:%M:%S")


def _runs(points: Sequence[Point]) -> list[list[tuple[float, float]]]:
    """Split points into runs without gaps (None or non-finite y starts a new run)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None or not math.isfinite(y) or not math.isfinite(x):
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append((x, y))
    return [r for r in runs if r]


def _path(frame: _Frame, run: list[tuple[float, float]], *, step: bool) -> str:
    parts = []
    prev_y: float | None = None
    for i, (x, y) in enumerate(run):
        px, py = frame.x(x), frame.y(y)
        if i == 0:
            parts.append(f"M{px:.1f},{py:.1f}")
        elif step and prev_y is not None:
            parts.append(f"H{px:.1f}V{py:.1f}")
        else:
            parts.append(f"L{px:.1f},{py:.1f}")
        prev_y = py
    return "".join(parts)


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    width: int = 560,
    height: int = 170,
    time_axis: bool = True,
    step: bool = False,
    y_unit: str = "",
    y_min: float | None = None,
    y_max: float | None = None,
    x_min: float | None = None,
    x_max: float | None = None,
    thresholds: Sequence[tuple[float, str]] = (),
    empty_text: str = "no data yet",
    y_integer: bool = False,
) -> Markup:
    """A chart of one or more series; ``time_axis`` reads x as epoch seconds (UTC labels)."""
    runs = [(s, _runs(s.points)) for s in series]
    xs = [x for _, rs in runs for r in rs for x, _ in r]
    ys = [y for _, rs in runs for r in rs for _, y in r]
    label = escape(title)
    head = (
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{label}" xmlns="http://www.w3.org/2000/svg"><title>{label}</title>'
    )
    if not xs:
        return Markup(
            f'{head}<rect class="chart-bg" x="0" y="0" width="{width}" height="{height}"/>'
            f'<text class="chart-empty" x="{width / 2}" y="{height / 2}" '
            f'text-anchor="middle">{escape(empty_text)}</text></svg>'
        )
    ys_all = ys + [t for t, _ in thresholds]
    lo = min(ys_all) if y_min is None else y_min
    hi = max(ys_all) if y_max is None else y_max
    ticks = nice_ticks(lo, hi, integer=y_integer)
    frame = _Frame(
        width=width,
        height=height,
        x0=min(xs) if x_min is None else x_min,
        x1=max(xs) if x_max is None else x_max,
        y0=ticks[0] if ticks and y_min is None else lo,
        y1=ticks[-1] if ticks and y_max is None else hi,
    )
    out = [head, f'<rect class="chart-bg" x="0" y="0" width="{width}" height="{height}"/>']
    for t in ticks:
        if not frame.y0 - 1e-12 <= t <= frame.y1 + 1e-12:
            continue
        py = frame.y(t)
        out.append(
            f'<line class="grid" x1="{frame.left}" x2="{width - frame.right}" '
            f'y1="{py:.1f}" y2="{py:.1f}"/>'
            f'<text class="tick" x="{frame.left - 4}" y="{py + 3:.1f}" '
            f'text-anchor="end">{escape(_fmt(t))}</text>'
        )
    if y_unit:
        out.append(f'<text class="unit" x="2" y="{frame.top + 2}">{escape(y_unit)}</text>')
    for value, name in thresholds:
        py = frame.y(value)
        out.append(
            f'<line class="threshold" x1="{frame.left}" x2="{width - frame.right}" '
            f'y1="{py:.1f}" y2="{py:.1f}"/><text class="threshold-label" '
            f'x="{width - frame.right - 2}" y="{py - 3:.1f}" text-anchor="end">'
            f"{escape(name)}</text>"
        )
    for x_value, anchor in ((frame.x0, "start"), (frame.x1, "end")):
        text = _time_label(x_value) if time_axis else _fmt(x_value)
        px = frame.x(x_value)
        out.append(
            f'<text class="tick" x="{px:.1f}" y="{height - 5}" text-anchor="{anchor}">'
            f"{escape(text)}</text>"
        )
    for i, (s, rs) in enumerate(runs):
        css = f"line {s.css or f'series-{i}'}" + (" dashed" if s.dashed else "")
        for r in rs:
            if len(r) == 1:
                px, py = frame.x(r[0][0]), frame.y(r[0][1])
                out.append(f'<circle class="{css} dot" cx="{px:.1f}" cy="{py:.1f}" r="2.5"/>')
            else:
                out.append(f'<path class="{css}" d="{_path(frame, r, step=step)}"/>')
    if len(series) > 1:
        x = frame.left + 6
        for i, s in enumerate(series):
            css = s.css or f"series-{i}"
            out.append(
                f'<rect class="swatch {css}" x="{x:.0f}" y="{frame.top}" width="10" height="3"/>'
                f'<text class="legend" x="{x + 13:.0f}" y="{frame.top + 4}">'
                f"{escape(s.name)}</text>"
            )
            x += 22 + 6.2 * len(s.name)
    out.append("</svg>")
    return Markup("".join(out))


def sparkline(
    values: Sequence[float | None], *, label: str, width: int = 120, height: int = 26
) -> Markup:
    """A small line without axes; the last value is marked."""
    points = [(float(i), v) for i, v in enumerate(values)]
    runs = _runs(points)
    text = escape(label)
    head = (
        f'<svg class="spark" viewBox="0 0 {width} {height}" role="img" aria-label="{text}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{text}</title>'
    )
    ys = [y for r in runs for _, y in r]
    if not ys:
        return Markup(f"{head}</svg>")
    lo, hi = min(ys), max(ys)
    if hi == lo:
        lo, hi = lo - 1.0, hi + 1.0
    frame = _Frame(
        width=width,
        height=height,
        left=1,
        right=3,
        top=3,
        bottom=3,
        x0=0.0,
        x1=max(len(values) - 1, 1),
        y0=lo,
        y1=hi,
    )
    out = [head]
    for r in runs:
        out.append(f'<path class="line series-0" d="{_path(frame, r, step=False)}"/>')
    last = runs[-1][-1]
    out.append(
        f'<circle class="dot series-0" cx="{frame.x(last[0]):.1f}" cy="{frame.y(last[1]):.1f}" '
        'r="2"/></svg>'
    )
    return Markup("".join(out))


def stacked_bar(
    segments: Sequence[Segment], *, label: str, width: int = 300, height: int = 14
) -> Markup:
    """One horizontal bar split in proportion to the segments' values."""
    total = sum(max(s.value, 0.0) for s in segments)
    text = escape(label)
    out = [
        f'<svg class="bar" viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img" '
        f'aria-label="{text}" xmlns="http://www.w3.org/2000/svg"><title>{text}</title>'
        f'<rect class="bar-bg" x="0" y="0" width="{width}" height="{height}"/>'
    ]
    x = 0.0
    for s in segments:
        if s.value <= 0 or total <= 0:
            continue
        w = s.value / total * width
        out.append(
            f'<rect class="seg {escape(s.css)}" x="{x:.2f}" y="0" width="{w:.2f}" '
            f'height="{height}"><title>{escape(s.label)}: {_fmt(s.value)}</title></rect>'
        )
        x += w
    out.append("</svg>")
    return Markup("".join(out))
