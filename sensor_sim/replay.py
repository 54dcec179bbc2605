"""Replay recorded readings with their original timing.

A recording is CSV (header `sensor,ts,metric,value`) or JSON lines
(`{"sensor": ..., "ts": ..., "metric": ..., "value": ...}` per line).  Rows
with the same sensor and ts become one datagram carrying the recorded ts;
datagrams go out in ts order, spaced as recorded, divided by `speed`.  The
whole file is read and checked before anything is sent, so a bad row is
reported with its line number and nothing half-replayed.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.config import decode_utf8
from collector.errors import ConfigError, EncodeError
from collector.wire import MAX_TS, encode

from .faults import FaultRates
from .net import Sender, Target
from .sim import (
    MAX_SLEEP_S,
    PROGRESS_EVERY_S,
    Engine,
    Progress,
    Signing,
    SimSensor,
    StopFlag,
    _NeverStop,
    build_report,
    check_signing,
    derive_boots,
    derive_seed,
)

COLUMNS = ("sensor", "ts", "metric", "value")


@dataclass(frozen=True)
class Group:
    """One datagram to replay: a sensor's readings at one recorded ts."""

    sensor: str
    ts: float
    readings: dict[str, int | float]
    line: int  # of the group's first row, for error messages
    lines: dict[str, int] = field(default_factory=dict)  # metric -> its row's line


def _culprit(group: Group, exc: EncodeError) -> tuple[int, str]:
    """The line of the row that made a group's datagram invalid, and why.

    Only on the error path: a row that is bad on its own (metric name, value)
    is found first; otherwise the datagram outgrew a limit (64 readings, 8192
    bytes) at the row whose reading crossed it.
    """
    for metric, value in group.readings.items():
        try:
            encode(group.sensor, 0, {metric: value}, ts=group.ts)
        except EncodeError as own:
            return group.lines.get(metric, group.line), str(own)
    prefix: dict[str, int | float] = {}
    for metric, value in group.readings.items():
        prefix[metric] = value
        try:
            encode(group.sensor, 0, prefix, ts=group.ts)
        except EncodeError as grown:
            return group.lines.get(metric, group.line), (
                f"{grown} (the datagram of sensor {group.sensor!r} at ts {group.ts!r} from line {group.line} on)"
            )
    return group.line, str(exc)


def _number(column: str, text: str) -> int | float:
    """A CSV field as a number; the error names the column (float's own message
    was "could not convert string to float: ''")."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{column} {text!r:.40} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{column} {text!r} is not finite") from None
    return value


def _rows_csv(lines: list[str]):
    reader = csv.DictReader(lines)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"line 1: CSV header must name {', '.join(COLUMNS)}; missing {', '.join(missing)}")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
            raise ValueError(f"line {reader.reader.line_num}: {exc}") from None
        line = reader.line_num
        if None in row.values() or None in row:
            raise ValueError(f"line {line}: expected {len(reader.fieldnames)} fields")
        try:
            ts = float(_number("ts", row["ts"]))
            value = _number("value", row["value"])
        except (ValueError, OverflowError) as exc:
            raise ValueError(f"line {line}: {exc}") from None
        yield line, row["sensor"].strip(), ts, row["metric"].strip(), value


def _rows_jsonl(lines: list[str]):
    for line, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {line}: not JSON: {exc.msg}") from None
        except RecursionError:
            raise ValueError(f"line {line}: not JSON: nested too deeply") from None
        if not isinstance(obj, dict) or any(c not in obj for c in COLUMNS):
            raise ValueError(f"line {line}: expected an object with keys {', '.join(COLUMNS)}")
        ts, value = obj["ts"], obj["value"]
        for name, v in (("ts", ts), ("value", value)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"line {line}: {name} must be a number, got {v!r:.40}")
        if not isinstance(obj["sensor"], str) or not isinstance(obj["metric"], str):
            raise ValueError(f"line {line}: sensor and metric must be strings")
        try:
            ts = float(ts)
        except OverflowError:  # an int literal too large for a float
            raise ValueError(f"line {line}: ts is not Unix seconds in [0, 2**32)") from None
        yield line, obj["sensor"], ts, obj["metric"], value


def load(path: str | Path) -> list[Group]:
    """Read and check a recording; ValueError('PATH:LINE: what is wrong') on bad input."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = decode_utf8(raw, str(path))  # validated before anything parses it
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    lines = text.splitlines()
    suffix = path.suffix.lower()
    if suffix == ".csv":
        jsonl = False
    elif suffix in (".jsonl", ".ndjson", ".json"):
        jsonl = True
    else:
        jsonl = text.lstrip().startswith("{")
    groups: dict[tuple[str, float], Group] = {}
    try:
        for line, sensor, ts, metric, value in (_rows_jsonl if jsonl else _rows_csv)(lines):
            if not 0.0 <= ts < MAX_TS:
                raise ValueError(f"line {line}: ts {ts!r} is not Unix seconds in [0, 2**32)")
            group = groups.get((sensor, ts))
            if group is None:
                group = groups[(sensor, ts)] = Group(sensor, ts, {}, line)
            if metric in group.readings:
                raise ValueError(f"line {line}: metric {metric!r} given twice for sensor {sensor!r} at ts {ts!r}")
            group.readings[metric] = value
            group.lines[metric] = line
    except ValueError as exc:
        raise ValueError(f"{path}:{str(exc).removeprefix('line ')}") from None
    if not groups:
        raise ValueError(f"{path}: no readings to replay")
    for group in groups.values():  # each must make a valid datagram
        try:
            encode(group.sensor, 0, group.readings, ts=group.ts)
        except EncodeError as exc:
            line, why = _culprit(group, exc)
            raise ValueError(f"{path}:{line}: {why}") from None
    return sorted(groups.values(), key=lambda g: g.ts)  # stable: file order within a ts


@dataclass
class ReplayConfig:
    targets: list[Target]
    groups: list[Group]
    speed: float = 1.0
    seed: int | None = None
    boot: bool = True
    boot_value: int | None = None
    start_seq: int = 0
    ttl: int = 1
    multicast_interface: str | None = None
    faults: FaultRates = field(default_factory=FaultRates)
    signing: Signing | None = None


def run_replay(
    cfg: ReplayConfig,
    *,
    stop: StopFlag | None = None,
    progress: Callable[[Progress], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Send every group at its recorded offset / speed; returns the report."""
    if not cfg.speed > 0:
        raise ConfigError("--speed must be > 0")
    stop = stop or _NeverStop()
    seed = derive_seed(cfg.seed)
    order = list(dict.fromkeys(g.sensor for g in cfg.groups))
    boots = derive_boots(len(order), enabled=cfg.boot, seed=cfg.seed, value=cfg.boot_value, now=wall())
    counts = Counter(g.sensor for g in cfg.groups)
    check_signing(cfg.signing, order, boots, cfg.start_seq, dict(counts))
    by_id = {sid: SimSensor(sid, boot, cfg.start_seq, signing=cfg.signing) for sid, boot in zip(order, boots)}
    sensors = list(by_id.values())
    t_first = cfg.groups[0].ts
    sender = Sender(cfg.targets, cfg.ttl, cfg.multicast_interface)
    try:
        engine = Engine(sender, cfg.faults, seed)
        start = clock()
        next_progress = PROGRESS_EVERY_S
        interrupted = False
        for group in cfg.groups:
            due = (group.ts - t_first) / cfg.speed
            while True:
                if stop.is_set():
                    interrupted = True
                    break
                now = clock() - start
                if now >= due:
                    break
                time.sleep(min(due - now, MAX_SLEEP_S))
            if interrupted:
                break
            engine.generate(by_id[group.sensor], group.readings, group.ts)
            if progress is not None and now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                progress(Progress(now, sender.sent, sender.failed))
        engine.drain(sensors)
        return build_report(sender, sensors, seed=seed, elapsed=clock() - start, interrupted=interrupted)
    finally:
        sender.close()
