"""Pictures in the terminal: a series as a braille line (plotille), a min/max band when
downsampled, and unicode-block sparklines.  Pure: rows in, text out; the caller asks the
server and owns the terminal.

A plot is sized to the data, not to the asked range: its x axis runs from the first to
the last reading found, and the aggregate buckets are sized so that one bucket is one
braille dot column (two per character), so `--since 7d` over a few seconds of data
draws those seconds, and a year draws in as many buckets as the terminal is wide.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

from .times import human_time

BLOCKS = "▁▂▃▄▅▆▇█"
EMPTY = "·"  # a bucket with nothing in it, told apart from a small count
# plotille's x axis line is the widest: 13 characters of y axis ("1234567890 | "), the
# canvas, one "|" and "-> (UTC)".
AXES_COLUMNS = 13 + 1 + 8
CHROME_LINES = 6  # title, y label, y max, two x axis lines, one line for the shell prompt


def sparkline(counts: Sequence[int | float]) -> str:
    """One block per count, scaled to the largest (▁ is at most 1/8 of it); zero is '·'."""
    top = max(counts, default=0)
    out = []
    for count in counts:
        if count <= 0:
            out.append(EMPTY)
        else:
            out.append(BLOCKS[max(0, math.ceil(count * len(BLOCKS) / top) - 1)])
    return "".join(out)


def canvas_size(columns: int, lines: int) -> tuple[int, int]:
    """The plot canvas (characters) that fits a terminal of columns x lines with its axes."""
    return max(20, columns - AXES_COLUMNS), max(5, lines - CHROME_LINES)


def bucket_for(first: float, last: float, dots: int) -> float:
    """Bucket width (seconds) giving about one bucket per dot column over [first, last]."""
    return max((last - first) / max(dots, 1), 0.001)


def _when(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds * 1000:.3g} ms"


def _x_ticks(span: float):
    fmt = "%H:%M:%S" if span < 86400 else "%d %H:%M" if span < 10 * 86400 else "%y-%m-%d"

    def tick(value: Any, _next: Any) -> str:
        return value.strftime(fmt) if isinstance(value, dt.datetime) else str(value)

    return tick


def _y_tick(value: Any, next_value: Any) -> str:
    """A tick label with as many decimals as the step between ticks needs (24.5, not 24.4999)."""
    if not isinstance(value, (int, float)):
        return str(value)
    step = abs(next_value - value)
    decimals = min(6, max(0, 1 - math.floor(math.log10(step)))) if step > 0 else 2
    text = f"{value:.{decimals}f}"
    return text if len(text) <= 10 else format(value, ".4g")


def render(
    sensor: str,
    metric: str,
    first: float,
    last: float,
    *,
    width: int,
    height: int,
    color: bool = False,
    points: Sequence[tuple[float, float]] = (),
    buckets: Sequence[dict[str, Any]] = (),
    bucket: float = 0.0,
) -> str:
    """Title line plus figure of the readings from `first` to `last` (their ts).

    Either `points` (ts, value), drawn as they are, or aggregate `buckets` of
    width `bucket` seconds, drawn as their average with a min/max band where a
    bucket holds more than one distinct value.
    """
    if not points and not buckets:
        raise ValueError("nothing to draw")
    x_lo, x_hi = (first, last) if last > first else (first - 1, first + 1)
    lows = [v for _, v in points] or [b["min"] for b in buckets]
    highs = [v for _, v in points] or [b["max"] for b in buckets]
    y_lo, y_hi = min(lows), max(highs)
    if y_hi <= y_lo:
        pad = abs(y_lo) * 0.01 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    # The canvas holds [min, max): one dot more at the top and right keeps the largest value
    # and the newest reading on it.
    y_hi += (y_hi - y_lo) / (height * 4)
    x_hi += (x_hi - x_lo) / (width * 2)

    import plotille  # only `plot` draws: the other commands start without it

    fig = plotille.Figure()
    fig.width, fig.height = width, height
    fig.with_colors = color
    fig.origin = False
    fig.x_label, fig.y_label = "UTC", metric[:8]
    fig.set_x_display_timezone(dt.UTC)
    fig.set_x_limits(min_=_when(x_lo), max_=_when(x_hi))
    fig.set_y_limits(min_=y_lo, max_=y_hi)
    fig.x_ticks_fkt = _x_ticks(x_hi - x_lo)
    fig.y_ticks_fkt = _y_tick
    banded = False
    if points:
        count = len(points)
        fig.plot([_when(ts) for ts, _ in points], [v for _, v in points], lc="cyan")
    else:
        count = sum(b["count"] for b in buckets)
        # Each bucket at its middle, kept inside the data's span.
        mids = [_when(min(max(b["start"] + bucket / 2, first), last)) for b in buckets]
        for mid, b in zip(mids, buckets):
            if b["max"] > b["min"]:
                fig.plot([mid, mid], [b["min"], b["max"]], lc="blue")
                banded = True
        fig.plot(mids, [b["avg"] for b in buckets], lc="cyan")
    title = f"{sensor} {metric}: {count} readings, {human_time(first)} .. {human_time(last)}"
    if buckets:
        how = f"average per {_duration(bucket)}" + (", min/max band" if banded else "")
        # On a second line when both do not fit (the canvas gives that line back).
        if len(title) + 2 + len(how) > width + AXES_COLUMNS:
            title += "\n" + how
            fig.height = max(1, height - 1)
        else:
            title += "; " + how
    return title + "\n" + fig.show() + "\n"
