"""Sensor health in the database: the I/O edge of collector/health.py.

`attach` primes the health book from the sensors table (what an earlier run
learned, so staleness works from the first minute after a restart) and hooks
a writer into the batch writer, which stores each flushed sensor's health in
the same transaction as its accounts, when it changed.  The caller tells the
book when the database refused a flush (`HealthBook.forget_written`), so the
next one writes every row again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from .health import HealthBook

UPDATE_HEALTH = "UPDATE sensors SET interval = ?, stale_after = ?, clock_offset = ?, clock_skewed = ? WHERE sensor = ?"


def attach(book: HealthBook, store) -> None:
    for sensor, interval, offset in store.conn.execute("SELECT sensor, interval, clock_offset FROM sensors"):
        book.prime(sensor, interval, offset)

    def write(conn: sqlite3.Connection, states: Iterable) -> None:
        # Only rows that changed: a steady sensor's health is the same from one
        # flush to the next (bench/metrics.py measures what that saves).
        rows = book.changed_rows(state.sensor for state in states)
        if rows:
            conn.executemany(UPDATE_HEALTH, rows)

    store.sensor_writers.append(write)
