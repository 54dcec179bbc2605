"""Boot values that cannot repeat: the clock, never below the last boot handed out + 1.

A boot taken from the clock alone (Unix seconds) repeats when a bridge
restarts within the same second: the collector then reads the new run's
(boot, seq 0, 1, ...) as duplicates of the old one's and drops its readings
(issue 13 item 10).  So the last boot given to each sensor id is kept in a
small file, and the next one is max(clock seconds, last + 1): it grows across
restarts however quick they are, and it stays close to the clock for sensors
that restart rarely (so a lost state file still gives a growing boot unless
restarts outpaced the clock).  The file is replaced atomically (write, fsync,
rename) under an flock, so concurrent starts of one id get distinct boots too.

`next_boot` is the rule, pure; `claim_boot` is the file edge.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from urllib.parse import quote

from collector.errors import ConfigError

BOOT_LIMIT = 1 << 32  # boot is a uint32 on the wire
STATE_DIR_ENV = "SENSOR_SIM_STATE_DIR"


def next_boot(last: int | None, now: float) -> int:
    """The boot after `last` (None: none handed out yet) at Unix time `now`."""
    boot = max(int(now), -1 if last is None else last + 1)
    if not 0 <= boot < BOOT_LIMIT:
        raise ConfigError(
            f"the next boot would be {boot}, outside uint32: pass boot= explicitly "
            f"(a boot that went backwards makes signed datagrams read as replays)"
        )
    return boot


def default_state_dir() -> Path:
    """$SENSOR_SIM_STATE_DIR, else $XDG_STATE_HOME/sensor-sim, else ~/.local/state/sensor-sim."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sensor-sim"


def boot_file_for(sensor_id: str, state_dir: Path | None = None) -> Path:
    """The state file of one sensor id (ids may hold '/' and '.': quoted, prefixed)."""
    return (state_dir or default_state_dir()) / f"boot-{quote(sensor_id, safe='')}"


def claim_boot(path: str | os.PathLike, now: float) -> int:
    """Hand out the next boot for the sensor whose state file is `path`, and persist it
    before returning (a device persists its boot before it sends with it).

    Raises ConfigError naming the file when it cannot be read or written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(
            f"cannot keep the boot counter in {path}: {exc.strerror} (pass boot=N, "
            f"boot_file=PATH, or set {STATE_DIR_ENV})"
        ) from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        last = _read_last(path)
        boot = next_boot(last, now)
        tmp = f"{path}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, f"{boot}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            raise ConfigError(
                f"cannot keep the boot counter in {path}: {exc.strerror} (pass boot=N, "
                f"boot_file=PATH, or set {STATE_DIR_ENV})"
            ) from None
        return boot
    finally:
        os.close(lock_fd)


def _read_last(path: Path) -> int | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the boot counter {path}: {exc.strerror}") from None
    text = raw.decode("ascii", "replace").strip()
    if not text.isdigit() or int(text) >= BOOT_LIMIT:
        # Not ours, or damaged: going on from the clock could repeat or go back.
        raise ConfigError(
            f"boot counter {path} holds {raw[:40]!r}, not a boot value: fix or delete it "
            f"(the next boot must be above the last one sent)"
        )
    return int(text)
