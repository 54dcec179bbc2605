"""Rendering results for people and scripts: aligned tables, JSON, CSV.  No I/O.

Tables are for people (times in ISO 8601 UTC, averages to 12 significant
digits, numbers right-aligned); CSV and JSON are for scripts and keep every
value as the server sent it (floats in their shortest round-trip form).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from .times import human_time

TIME_FIELDS = {"ts", "first_seen", "last_seen", "start", "detected_at", "last_flush"}


def flatten(result: dict[str, Any], human: bool = False) -> list[dict[str, Any]]:
    """A single object (ping, stats) as key/value rows; nested objects as key.sub.

    For a person (`human`), counts by reason (stats' `rejected`) become their
    total and the reasons that happened; CSV keeps every key for scripts.
    """
    rows = []
    for key, value in result.items():
        if isinstance(value, dict):
            if human and all(type(v) in (int, float) for v in value.values()):
                rows.append({"key": key, "value": sum(value.values())})
                value = {k: v for k, v in value.items() if v}
            rows += [{"key": f"{key}.{k}", "value": v} for k, v in value.items()]
        else:
            rows.append({"key": key, "value": value})
    return rows


# Computed by the server from many readings (sum and its quotient): their last digits are
# rounding error, so CSV writes them to 15 significant digits (21.736, not 21.735999999999997).
# Stored values (value, ts, min, max) keep repr, the shortest text that reads back exactly.
COMPUTED_FIELDS = {"avg", "sum"}


def number(value: float, digits: int) -> str:
    """A float to `digits` significant digits, in its shortest form; whole numbers without '.0'."""
    rounded = float(format(value, f".{digits}g"))
    if rounded.is_integer() and abs(rounded) < 1e15:
        return str(int(rounded))
    return repr(rounded)


def cell(key: str, value: Any, human: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if human and (key in TIME_FIELDS) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return human_time(value)
    if isinstance(value, float) and human:
        # 12 significant digits: 16.8275, not the 16.827499999999997 of an average; 20, not 20.0.
        return number(value, 12)
    if isinstance(value, float) and key in COMPUTED_FIELDS:
        return repr(float(format(value, ".15g")))
    return repr(value) if isinstance(value, float) else str(value)


def iso_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with their time fields as ISO 8601 UTC text (--times iso)."""
    return [
        {k: human_time(v) if k in TIME_FIELDS and isinstance(v, (int, float)) else v for k, v in row.items()}
        for row in rows
    ]


def render(rows: list[dict[str, Any]], fmt: str, columns: list[str] | None = None, iso: bool = False) -> str:
    """Rows as a table (for people), JSON or CSV; `iso` writes JSON/CSV times as ISO 8601 UTC."""
    if iso and fmt != "table":
        rows = iso_times(rows)
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    columns = columns or (list(rows[0]) if rows else [])
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([cell(c, row.get(c), False) for c in columns])
        return out.getvalue()
    cells = [[cell(c, row.get(c), True) for c in columns] for row in rows]
    numeric = [
        all(
            isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool) and c not in TIME_FIELDS
            for row in rows
        )
        and rows
        for c in columns
    ]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns)] + [line(r) for r in cells]) + "\n"
