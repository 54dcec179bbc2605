"""recvmmsg through ctypes (collector/mmsg.py): real UDP sockets on loopback, v4 and v6."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from collector import mmsg, net, tuning


def test_recvmmsg_is_available_on_linux():
    # The collector's fast receive path must not fall back silently where it is
    # deployed (Linux); elsewhere the recv path runs (tests/test_collector.py).
    assert mmsg.available() == sys.platform.startswith("linux")


@contextmanager
def pair(family: int = socket.AF_INET) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A non-blocking receiver and a sender on loopback, closed afterwards."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    r = socket.socket(family, socket.SOCK_DGRAM)
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        r.bind((host, 0))
        r.setblocking(False)
        s.bind((host, 0))
        yield r, s
    finally:
        r.close()
        s.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_datagrams_come_back_whole_in_order_with_their_sources(family):
    with pair(family) as (r, s):
        sent = [bytes([i]) * (1 + i * 37) for i in range(10)]
        for data in sent:
            s.sendto(data, r.getsockname())
        rx = mmsg.BatchReceiver(r, 4, 512)
        got, addresses = [], []
        while True:
            datas, cut, drops = rx.receive()
            if not datas:
                break
            assert cut == 0 and drops is None and len(datas) <= 4
            got += datas
            addresses += [rx.address(i) for i in range(len(datas))]
            assert mmsg.Addresses(rx, len(datas))[0] == addresses[-len(datas)]
        assert got == sent
        assert {a[:2] for a in addresses} == {s.getsockname()[:2]}
        assert rx.receive() == ([], 0, None)  # EAGAIN: nothing queued


def test_a_limit_reads_no_more_than_asked():
    with pair() as (r, s):
        for i in range(5):
            s.sendto(bytes([i]), r.getsockname())
        rx = mmsg.BatchReceiver(r, 8, 64)
        assert rx.receive(2)[0] == [b"\x00", b"\x01"]
        assert rx.receive()[0] == [b"\x02", b"\x03", b"\x04"]


def test_a_datagram_longer_than_its_slot_is_cut_counted_and_left_out():
    with pair() as (r, s):
        for data in (b"a" * 10, b"b" * 65, b"c" * 64, b"d" * 3):
            s.sendto(data, r.getsockname())
        rx = mmsg.BatchReceiver(r, 8, 64)
        datas, cut, _ = rx.receive()
        assert datas == [b"a" * 10, b"c" * 64, b"d" * 3] and cut == 1
        # Sources follow the datagrams kept, not the slots.
        assert [rx.address(i)[1] for i in range(3)] == [s.getsockname()[1]] * 3


def test_the_kernel_drop_count_comes_with_the_next_datagram():
    with pair() as (r, s):
        r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert net.enable_drop_counter(r)
        for _ in range(500):  # far more than a 4 KiB buffer holds
            s.sendto(bytes(100), r.getsockname())
        rx = mmsg.BatchReceiver(r, 64, 256)
        kept = 0
        while datas := rx.receive()[0]:
            kept += len(datas)
        dropped = net.read_drops(r)
        assert 0 < kept < 500 and dropped == 500 - kept
        s.sendto(b"after", r.getsockname())
        datas, cut, drops = rx.receive()
        assert datas == [b"after"] and drops == dropped


def test_a_closed_socket_is_an_oserror_not_a_crash():
    with pair() as (r, _):
        rx = mmsg.BatchReceiver(r, 4, 64)
        r.close()  # fileno() is -1 now: EBADF
        with pytest.raises(OSError):
            rx.receive()


def test_vlen_and_slot_size_of_the_collector():
    assert 1 <= tuning.RECVMMSG_VLEN <= 1024  # Linux caps vlen at UIO_MAXIOV (1024)


@pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg in this libc")
def test_recvmmsg_keeps_the_gil():
    """The call is made without releasing the GIL (ctypes.PyDLL): released, the
    collector's writer thread took it at every receive and the loop waited up to
    the switch interval (5 ms) to read on (docs/OPERATIONS.md, session 6)."""
    import ctypes

    assert mmsg._recvmmsg._flags_ & ctypes._FUNCFLAG_PYTHONAPI
