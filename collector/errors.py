"""Errors of the collector package.

The peer's fault (a sensor sent bad bytes) is kept apart from misuse by the
caller (our own code asked for something impossible) and from trouble in the
environment an operator can act on (a port in use, a database not writable).
The command-line edge turns ConfigError/SetupError into one readable line.
"""

from __future__ import annotations


class TelemetryError(Exception):
    """Base of every error this package raises on purpose."""


class DecodeError(TelemetryError):
    """A datagram was rejected. `reason` is one of wire.REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail or reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class EncodeError(TelemetryError, ValueError):
    """The caller asked to encode a datagram that would not decode."""


class ConfigError(TelemetryError):
    """A flag or config-file value is wrong; the message names it."""


class SetupError(TelemetryError):
    """The environment refused something (bind, join, open); the message says what to change."""
