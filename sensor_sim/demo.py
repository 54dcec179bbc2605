"""A placeholder demo: simulated sensors with 5 % loss, and an in-process receiver that counts them.

`python -m sensor_sim.demo` starts a UDP receiver on 127.0.0.1 (port 0) that
decodes every datagram with collector.wire.decode, runs 5 simulated sensors
for about 3 s with 5 % injected loss, and prints, per sensor, what the
simulator generated, dropped on purpose and sent next to what the receiver
got.  The full-system demo (collector, SQLite, query) will replace it.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections import Counter

from collector.errors import DecodeError
from collector.wire import decode

from .net import resolve
from .faults import FaultRates
from .sim import SimConfig, run


class _Receiver:
    """Counts decoded datagrams per sensor in a thread; stop() joins it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.counts: Counter[str] = Counter()
        self.rejected = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="demo-receiver")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            try:
                self.counts[decode(data).sensor] += 1
            except DecodeError:
                self.rejected += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def main(duration: float = 3.0, out=sys.stdout) -> int:
    receiver = _Receiver()
    try:
        cfg = SimConfig(targets=[resolve("127.0.0.1", receiver.port)], sensors=5, rate=20.0,
                        duration=duration, faults=FaultRates(loss=0.05))
        print(f"demo: 5 sensors at 20 Hz for {duration:g} s with 5 % loss -> "
              f"127.0.0.1:{receiver.port}", file=out)
        report = run(cfg)
        deadline = time.monotonic() + 2.0  # loopback delivers at once; this is slack
        while sum(receiver.counts.values()) < report["datagrams_sent"] and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        receiver.stop()
    print(f"{'sensor':<10} {'generated':>9} {'dropped':>8} {'sent':>6} {'received':>9}", file=out)
    for sensor_id, truth in report["sensors"].items():
        sent = truth["generated"] - len(truth["dropped"]) - len(truth["send_failed"])
        print(f"{sensor_id:<10} {truth['generated']:>9} {len(truth['dropped']):>8} {sent:>6} "
              f"{receiver.counts[sensor_id]:>9}", file=out)
    received = sum(receiver.counts.values())
    print(f"total: {report['datagrams_sent']} sent, {received} received, "
          f"{receiver.rejected} rejected (seed {report['seed']})", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
