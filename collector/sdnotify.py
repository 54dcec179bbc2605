"""systemd readiness and watchdog notifications (sd_notify), without libsystemd.

The protocol is a few text lines in one datagram to the AF_UNIX socket named
by $NOTIFY_SOCKET (a path, or '@name' for the abstract namespace): see
sd_notify(3).  Outside systemd the variable is unset and every call is a
cheap no-op, so the daemons call it unconditionally.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    """Sends READY=1 / WATCHDOG=1 / STOPPING=1 to systemd when asked to.

    WATCHDOG=1 is rate-limited to half the interval systemd asked for
    (WatchdogSec= arrives as $WATCHDOG_USEC), as sd_watchdog_enabled(3)
    recommends, so calling it from every loop tick costs nothing.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = self._address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = self._watchdog_interval(env)
        self._next_watchdog = 0.0
        self._sock: socket.socket | None = None

    @staticmethod
    def _address(name: str) -> str | None:
        if not name or name[0] not in "/@":
            return None
        return "\0" + name[1:] if name[0] == "@" else name

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid != str(os.getpid()):
            return None  # the watchdog is meant for another process
        return int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def __call__(self, message: str) -> bool:
        """Send one notification; returns whether it was sent."""
        if self.address is None:
            return False
        if message == "WATCHDOG=1":
            if self.watchdog_interval is None:
                return False
            now = time.monotonic()
            if now < self._next_watchdog:
                return False
            self._next_watchdog = now + self.watchdog_interval / 2
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), self.address)
        except OSError:
            return False  # systemd gone or socket unreachable: nothing useful to do
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
