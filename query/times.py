"""Times and durations as people type them, and back: pure (the caller passes `now`).

`parse_time` takes Unix seconds, ISO 8601 (no offset means UTC), 'now' or an
age ('15m', '2h', '7d ago'); `parse_duration` takes seconds or '90s', '1h30m';
`human_time` writes Unix seconds as ISO 8601 UTC.  The command line reads the
clock once, at its edge, and hands it in.
"""

from __future__ import annotations

import datetime as dt
import math
import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """'300', '90s', '5m', '1h30m', '2d' -> seconds (> 0).  Raises ValueError."""
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        pos, value = 0, 0.0
        for match in _DURATION_RE.finditer(s):
            if match.start() != pos:
                break
            value += float(match.group(1)) * _UNITS[match.group(2).lower()]
            pos = match.end()
        if pos != len(s) or not s:
            raise ValueError(f"{text!r} is not a duration: use seconds or e.g. 30s, 5m, 2h, 7d") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r}: a duration must be > 0")
    return int(value) if value == int(value) else value


def parse_time(text: str, now: float) -> float:
    """A point in time as Unix seconds.

    Accepts Unix seconds ('1700000000', '1700000000.5'), ISO 8601
    ('2026-11-25T20:00:00Z', '2026-11-25 20:00', '2026-11-25'; no offset
    means UTC), 'now', and a duration ago ('15m', '2h', '7d', '15m ago').
    """
    s = text.strip()
    if s.lower() == "now":
        return float(now)
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a time")
        return value
    relative = s[:-4].rstrip() if s.lower().endswith(" ago") else s
    try:
        return float(now) - parse_duration(relative)
    except ValueError:
        pass
    iso = s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s
    try:
        when = dt.datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use Unix seconds, ISO 8601 (2026-11-25T20:00:00Z) or an age (15m, 2h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def human_time(value: float | None) -> str:
    """Unix seconds -> ISO 8601 UTC, milliseconds only when there are any."""
    if value is None:
        return ""
    try:
        when = dt.datetime.fromtimestamp(value, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return repr(value)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += f".{when.microsecond // 1000:03d}"
    return text + "Z"


def iso_time(value: float) -> str:
    """Unix seconds -> ISO 8601 UTC to the microsecond (export): '...T20:46:11Z', '.441Z' or '.441250Z'.

    A float Unix time carries about 0.2 us at today's dates, so microseconds
    keep what a sensor sent; `--times unix` gives the float itself.
    """
    try:
        when = dt.datetime.fromtimestamp(value, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return repr(value)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    micros = when.microsecond
    if micros % 1000 == 0 and micros:
        text += f".{micros // 1000:03d}"
    elif micros:
        text += f".{micros:06d}"
    return text + "Z"
