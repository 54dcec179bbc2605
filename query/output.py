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


def cell(key: str, value: Any, human: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if human and (key in TIME_FIELDS) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return human_time(value)
    if isinstance(value, float) and human:
        # 12 significant digits: 16.8275, not the 16.827499999999997 of an average.
        # CSV keeps repr: 12 digits would cut a Unix ts to 10 ms.
        return repr(float(format(value, ".12g")))
    return repr(value) if isinstance(value, float) else str(value)


def render(rows: list[dict[str, Any]], fmt: str, columns: list[str] | None = None) -> str:
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
    numeric = [all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)
                   and c not in TIME_FIELDS for row in rows) and rows for c in columns]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns)] + [line(r) for r in cells]) + "\n"
