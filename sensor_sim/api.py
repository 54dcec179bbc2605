"""A small API to send readings as one sensor: bridge a real device in a few lines.

    from sensor_sim import Sensor
    s = Sensor("greenhouse-1", target=("192.0.2.10", 4739))
    s.send({"temp": 21.5, "hum": 40})   # returns the seq sent

Each `send` encodes one wire-format-v1 datagram with `collector.wire.encode`
(seq counting up from `seq`, wrapping at 2**32; ts = now unless given) and
sends it with one sendto.  Invalid readings raise EncodeError before anything
is sent and do not use up a seq.
"""

from __future__ import annotations

import time

from collector.wire import encode

from .faults import SEQ_MASK
from .net import Sender, parse_target, resolve

DEFAULT_UDP_PORT = 4739  # the collector's documented UDP port


class Sensor:
    """One sensor: an id, a boot value, a sequence counter and a socket.

    target: (host, port) or "HOST:PORT" / "[V6ADDR]:PORT".
    boot: None picks one from the clock (Unix seconds, so it grows across
    restarts of the bridge); False sends no boot; an int is sent as given.
    """

    def __init__(self, sensor_id: str, target: tuple[str, int] | str = ("127.0.0.1", DEFAULT_UDP_PORT),
                 *, boot: int | bool | None = None, seq: int = 0, ttl: int = 1,
                 multicast_interface: str | None = None) -> None:
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
