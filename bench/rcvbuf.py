"""How long a UDP receive buffer lasts: datagrams one socket holds before the kernel drops, per payload size.

Fills a loopback socket that nobody reads (SO_RCVBUF asked as the collector asks, 8 MiB by
default), counts what it holds (one non-blocking drain afterwards), and prints the kernel's
charge per datagram (granted bytes / datagrams held: the skb truesize, far more than the
payload) and how many milliseconds the buffer bridges at a given rate.  Public tools only:
plain sockets.  Run: .venv/bin/python bench/rcvbuf.py [--rcvbuf BYTES] [--rate N]
"""

from __future__ import annotations

import argparse
import socket


def held(rcvbuf: int, payload: int) -> tuple[int, int]:
    """(granted bytes, datagrams held) for datagrams of `payload` bytes."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            rx.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE (needs CAP_NET_ADMIN)
        except OSError:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        granted = rx.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        rx.bind(("127.0.0.1", 0))
        target = rx.getsockname()
        data = b"x" * payload
        # Bounded: far more than any buffer can hold (granted / 256 bytes minimum truesize, x2).
        for _ in range(2 * granted // 256):
            tx.sendto(data, target)
        rx.setblocking(False)
        count = 0
        while True:
            try:
                rx.recv(65536)
            except BlockingIOError:
                break
            count += 1
        return granted, count
    finally:
        rx.close()
        tx.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rcvbuf", type=int, default=8 * 1024 * 1024, help="bytes asked (default 8 MiB)")
    parser.add_argument("--rate", type=int, default=100_000, help="datagrams/s to size against (default 100,000)")
    args = parser.parse_args()
    print(f"asked {args.rcvbuf} bytes; net.core.rmem_max = {open('/proc/sys/net/core/rmem_max').read().strip()}")
    print(
        f"{'payload B':>9}  {'granted B':>10}  {'held':>7}  {'B/datagram':>10}  {'ms at ' + format(args.rate, ',') + '/s':>14}"
    )
    for payload in (40, 75, 100, 200, 500):
        granted, count = held(args.rcvbuf, payload)
        print(
            f"{payload:>9}  {granted:>10}  {count:>7}  {granted / max(count, 1):>10.0f}  "
            f"{1000 * count / args.rate:>14.0f}"
        )


if __name__ == "__main__":
    main()
