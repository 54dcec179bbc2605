"""A small API to send readings as one sensor: bridge a real device in a few lines.

    from sensor_sim import Sensor
    s = Sensor("greenhouse-1", target=("192.0.2.10", 4739))
    s.send({"temp": 21.5, "hum": 40})   # returns the seq sent

Each `send` encodes one wire-format-v1 datagram with `collector.wire.encode`
(seq counting up from `seq`, wrapping at 2**32; ts = now unless given) and
sends it with one sendto.  Invalid readings raise EncodeError before anything
is sent and do not use up a seq.  With `key=` every datagram is signed
(`collector.auth.sign`); then seq never wraps under one boot: after
2**32 - 1 the sensor increments `boot` and restarts at seq 0, as
docs/PROTOCOL.md asks (a real device persists `boot` before sending with it).
"""

from __future__ import annotations

import numbers
import operator
import os
import time

from collector.auth import key_allows, parse_key, sign
from collector.errors import ConfigError, EncodeError
from collector.wire import encode

from .bootstate import BOOT_LIMIT, boot_file_for, claim_boot
from .faults import SEQ_MASK
from .net import Sender, parse_target, resolve

DEFAULT_UDP_PORT = 4739  # the collector's documented UDP port


class Sensor:
    """One sensor: an id, a boot value, a sequence counter and a socket.

    target: (host, port) or "HOST:PORT" / "[V6ADDR]:PORT".
    boot: None picks one that grows across restarts of the bridge, however
    quick: max(Unix seconds, the last boot of this id + 1), kept in
    `boot_file` (default: one file per id under $SENSOR_SIM_STATE_DIR, else
    $XDG_STATE_HOME/sensor-sim or ~/.local/state/sensor-sim) and written
    before the first send; False sends no boot; an integer in [0, 2**32) is
    sent as given (anything else is an EncodeError, never masked).
    seq: the first seq, an integer in [0, 2**32).
    key: bytes or hex text (16-64 bytes) to sign with, under key_id (default:
    the sensor id; "id@suffix" for a rotated key).  Signing needs a boot.
    """

    def __init__(
        self,
        sensor_id: str,
        target: tuple[str, int] | str = ("127.0.0.1", DEFAULT_UDP_PORT),
        *,
        boot: int | bool | None = None,
        seq: int = 0,
        ttl: int = 1,
        multicast_interface: str | None = None,
        key_id: str | None = None,
        key: bytes | str | None = None,
        boot_file: str | os.PathLike | None = None,
    ) -> None:
        if isinstance(target, str):
            resolved = parse_target(target)
        else:
            host, port = target
            resolved = resolve(host, int(port))
        encode(sensor_id, 0, {"x": 0})  # EncodeError now, not at the first send
        first_seq = _uint32("seq", seq)
        self._boot_file = None
        if boot is False:
            self.boot = None
        elif boot is None or boot is True:
            self._boot_file = boot_file_for(sensor_id) if boot_file is None else boot_file
            self.boot = claim_boot(self._boot_file, time.time())
        else:
            self.boot = _uint32("boot", boot)
        self.key_id: str | None = None
        self._key: bytes | None = None
        if key is not None:
            key_bytes = parse_key(key) if isinstance(key, str) else bytes(key)
            key_id = sensor_id if key_id is None else key_id
            if not key_allows(key_id, sensor_id):
                raise ConfigError(f"key id {key_id!r} cannot sign for sensor {sensor_id!r}")
            if self.boot is None:
                raise ConfigError("signed datagrams carry boot: do not pass boot=False with a key")
            sign(b"\x80", key_id, key_bytes)  # EncodeError now for a bad key id or key length
            self.key_id, self._key = key_id, key_bytes
        elif key_id is not None:
            raise ConfigError("key_id without key")
        self.id = sensor_id
        self.target = resolved
        self.seq = first_seq  # the seq the next send will carry
        self._sender = Sender([resolved], ttl, multicast_interface)

    def send(self, readings: dict[str, int | float], *, ts: float | None = None) -> int:
        """Send one datagram of `readings`; returns its seq.

        Raises EncodeError for readings the wire format cannot carry, and
        OSError-derived SetupError when the network refuses the datagram.
        A transient failure (full buffer) is counted in `failed` and the seq
        is still used, as a real lossy link would.
        """
        seq = self.seq
        if ts is not None and type(ts) is not float and type(ts) is not int:
            ts = _number("ts", ts)
        data = encode(self.id, seq, _numbers(readings), boot=self.boot, ts=time.time() if ts is None else ts)
        if self._key is not None:
            data = sign(data, self.key_id, self._key)
            if seq == SEQ_MASK:  # never wrap under one boot: the next datagram starts a new one
                if self._boot_file is not None:
                    self.boot = claim_boot(self._boot_file, time.time())  # persisted, as at a start
                elif self.boot + 1 < BOOT_LIMIT:
                    self.boot += 1
                else:
                    raise EncodeError(
                        "seq and boot are both at 2**32 - 1: a signed sensor cannot send "
                        "again without repeating a (boot, seq); give it a new key"
                    )
        self.seq = (seq + 1) & SEQ_MASK
        self._sender.send(data)
        return seq

    @property
    def sent(self) -> int:
        return self._sender.sent

    @property
    def failed(self) -> int:
        return self._sender.failed

    def close(self) -> None:
        self._sender.close()

    def __enter__(self) -> Sensor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sensor({self.id!r}, target={self.target.label!r}, boot={self.boot}, seq={self.seq})"


def _uint32(what: str, value: object) -> int:
    """An integer in [0, 2**32) (anything with __index__, numpy integers too), or EncodeError."""
    if isinstance(value, bool):
        raise EncodeError(f"{what} {value!r} must be an integer in [0, 2**32), not a bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise EncodeError(f"{what} {value!r} must be an integer in [0, 2**32), not {type(value).__name__}") from None
    if not 0 <= number < BOOT_LIMIT:
        raise EncodeError(f"{what} {number} is outside [0, 2**32): it is sent as given, never masked")
    return number


def _number(what: str, value: object) -> int | float:
    """A reading or ts the wire can carry: int and float as they are; anything with
    __index__ (numpy integers) as an int, any other real number (numbers.Real,
    or anything with __float__: numpy floats, Decimal, Fraction) as a float."""
    t = type(value)
    if t is float or t is int or t is bool:
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, numbers.Integral) or hasattr(t, "__index__"):
        return operator.index(value)
    if isinstance(value, numbers.Real) or hasattr(t, "__float__"):
        return float(value)
    raise EncodeError(
        f"{what} is {t.__name__}, not a number (give an int, a float, or anything with "
        f"__index__ or __float__, such as a numpy scalar)"
    )


def _numbers(readings: dict) -> dict:
    """The readings with numpy-like scalars made plain; the same dict when all are."""
    out = None
    for name, value in readings.items():
        t = type(value)
        if t is float or t is int or t is bool:
            continue
        if out is None:
            out = dict(readings)
        out[name] = _number(f"reading {name}", value)
    return readings if out is None else out
