"""Bar charts as server-rendered SVG: geometry computed here, drawn by ``_chart.html``.

No script and no external asset: the browser draws the ``<svg>`` from the page
itself, so the charts work offline and under a CSP that allows no script. Each bar
carries a ``<title>`` (the browser's own tooltip) with its exact value. Colours come
from the stylesheet by series index (``series-0`` ...), never from inline styles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

#: Distinct colours the stylesheet defines; further series share the last ("other").
SERIES_COLOURS = 8
#: The series the smallest ones are folded into.
OTHER_SERIES = "(other models)"

WIDTH = 760
HEIGHT = 240
_LEFT = 64  # room for the y axis labels
_RIGHT = 8
_TOP = 10
_BOTTOM = 28  # room for the x axis labels


@dataclass(frozen=True)
class Bar:
    """One rectangle, in SVG user units, with its tooltip."""

    x: float
    y: float
    width: float
    height: float
    series: int
    title: str


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str


@dataclass
class BarChart:
    """A (possibly stacked) bar chart ready to draw.

    Attributes:
        title: What the chart shows, also its accessible name.
        legend: ``(series index, name)`` of each series, when more than one.
        empty: No value in the window: the template says so instead of drawing axes.
    """

    title: str
    width: int = WIDTH
    height: int = HEIGHT
    bars: list[Bar] = field(default_factory=list)
    x_labels: list[Label] = field(default_factory=list)
    y_labels: list[Label] = field(default_factory=list)
    gridlines: list[float] = field(default_factory=list)
    legend: list[tuple[int, str]] = field(default_factory=list)
    empty: bool = True

    @property
    def plot_left(self) -> int:
        return _LEFT

    @property
    def plot_right(self) -> int:
        return self.width - _RIGHT

    @property
    def baseline(self) -> int:
        return self.height - _BOTTOM


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value``."""
    if value <= 0:
        return 1
    magnitude = 1.0
    while magnitude * 10 <= value:
        magnitude *= 10
    while magnitude > value:
        magnitude /= 10
    for factor in (1, 2, 5, 10):
        if factor * magnitude >= value:
            return factor * magnitude
    return 10 * magnitude


def compact_number(value: float) -> str:
    """``1234567`` -> ``1.2M``: axis labels stay short."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            scaled = value / limit
            return (
                f"{scaled:.0f}{suffix}"
                if scaled >= 10
                else f"{scaled:.1f}{suffix}".replace(".0", "")
            )
    return f"{value:.0f}"


def stacked_bars(
    title: str,
    buckets: Sequence[datetime],
    series: Sequence[str],
    values: Mapping[tuple[datetime, str], int],
    *,
    bucket_label: Callable[[datetime], str],
    unit: str,
) -> BarChart:
    """One bar per bucket, stacked by series (first series at the bottom).

    ``values[(bucket, series name)]`` is the value; missing pairs are zero. Only
    series in ``series`` are drawn: the caller folds the rest into an "other" series.
    """
    chart = BarChart(title=title)
    totals = [sum(values.get((bucket, name), 0) for name in series) for bucket in buckets]
    if not buckets or max(totals, default=0) <= 0:
        return chart
    chart.empty = False
    # Round steps (1, 2 or 5 times a power of ten), about four of them.
    step = _nice_ceiling(max(totals) / 4)
    steps = max(1, math.ceil(max(totals) / step))
    top = step * steps
    plot_height = chart.baseline - _TOP
    slot = (chart.plot_right - chart.plot_left) / len(buckets)
    bar_width = max(1.0, slot * 0.7)
    for tick in range(steps + 1):
        y = chart.baseline - plot_height * tick / steps
        chart.gridlines.append(round(y, 2))
        chart.y_labels.append(
            Label(chart.plot_left - 6, round(y + 4, 2), compact_number(step * tick))
        )
    label_every = max(1, len(buckets) // 8)  # at most ~8 x labels, whatever the window
    for index, bucket in enumerate(buckets):
        x = chart.plot_left + slot * index + (slot - bar_width) / 2
        stacked = 0.0
        for series_index, name in enumerate(series):
            value = values.get((bucket, name), 0)
            if value <= 0:
                continue
            height = plot_height * value / top
            y = chart.baseline - plot_height * stacked / top - height
            stacked += value
            chart.bars.append(
                Bar(
                    x=round(x, 2),
                    y=round(y, 2),
                    width=round(bar_width, 2),
                    height=round(max(height, 0.5), 2),
                    series=min(series_index, SERIES_COLOURS - 1),
                    title=f"{bucket_label(bucket)} · {name}: {value:,} {unit}",
                )
            )
        if index % label_every == 0:
            chart.x_labels.append(
                Label(round(x + bar_width / 2, 2), chart.height - 8, bucket_label(bucket))
            )
    if len(series) > 1:
        chart.legend = [(min(index, SERIES_COLOURS - 1), name) for index, name in enumerate(series)]
    return chart


def top_series(
    values: Mapping[tuple[datetime, str], int], *, keep: int = SERIES_COLOURS - 1
) -> tuple[list[str], dict[tuple[datetime, str], int]]:
    """The ``keep`` largest series by total, the rest summed into :data:`OTHER_SERIES`."""
    totals: dict[str, int] = {}
    for (_, name), value in values.items():
        totals[name] = totals.get(name, 0) + value
    ranked = sorted(totals, key=lambda name: (-totals[name], name))
    if len(ranked) <= keep + 1:
        return ranked, dict(values)
    kept = set(ranked[:keep])
    folded: dict[tuple[datetime, str], int] = {}
    for (bucket, name), value in values.items():
        key = (bucket, name if name in kept else OTHER_SERIES)
        folded[key] = folded.get(key, 0) + value
    return [*ranked[:keep], OTHER_SERIES], folded
