"""Helpers for tests: waiting on conditions with a deadline, never fixed sleeps."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
