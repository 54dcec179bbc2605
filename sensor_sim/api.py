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

import time

from collector.auth import key_allows, parse_key, sign
from collector.errors import ConfigError
from collector.wire import encode

from .faults import SEQ_MASK
from .net import Sender, parse_target, resolve

DEFAULT_UDP_PORT = 4739  # the collector's documented UDP port


class Sensor:
    """One sensor: an id, a boot value, a sequence counter and a socket.

    target: (host, port) or "HOST:PORT" / "[V6ADDR]:PORT".
    boot: None picks one from the clock (Unix seconds, so it grows across
    restarts of the bridge); False sends no boot; an int is sent as given.
    key: bytes or hex text (16-64 bytes) to sign with, under key_id (default:
    the sensor id; "id@suffix" for a rotated key).  Signing needs a boot.
    """

    def __init__(self, sensor_id: str, target: tuple[str, int] | str = ("127.0.0.1", DEFAULT_UDP_PORT),
                 *, boot: int | bool | None = None, seq: int = 0, ttl: int = 1,
                 multicast_interface: str | None = None, key_id: str | None = None,
                 key: bytes | str | None = None) -> None:
        if isinstance(target, str):
            resolved = parse_target(target)
        else:
            host, port = target
            resolved = resolve(host, int(port))
        encode(sensor_id, 0, {"x": 0})  # EncodeError now, not at the first send
        if boot is False:
            self.boot = None
        elif boot is None or boot is True:
            self.boot = int(time.time()) & SEQ_MASK
        else:
            self.boot = int(boot) & SEQ_MASK
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
        self.seq = seq & SEQ_MASK  # the seq the next send will carry
        self._sender = Sender([resolved], ttl, multicast_interface)

    def send(self, readings: dict[str, int | float], *, ts: float | None = None) -> int:
        """Send one datagram of `readings`; returns its seq.

        Raises EncodeError for readings the wire format cannot carry, and
        OSError-derived SetupError when the network refuses the datagram.
        A transient failure (full buffer) is counted in `failed` and the seq
        is still used, as a real lossy link would.
        """
        seq = self.seq
        data = encode(self.id, seq, readings, boot=self.boot, ts=time.time() if ts is None else ts)
        if self._key is not None:
            data = sign(data, self.key_id, self._key)
            if seq == SEQ_MASK:  # never wrap under one boot: the next datagram starts a new one
                self.boot = (self.boot + 1) & SEQ_MASK
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
