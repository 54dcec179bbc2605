"""Socket set-up: real sockets on loopback, errors that say what to change."""

from __future__ import annotations

import socket

import pytest

from collector import net, tuning
from collector.errors import ConfigError, SetupError

from helpers import wait_for

LINUX = net.IS_LINUX


@pytest.mark.parametrize(
    "text, expected",
    [
        ("239.1.2.3", ("239.1.2.3", None)),
        ("239.1.2.3:5000", ("239.1.2.3", 5000)),
        ("ff15::beef", ("ff15::beef", None)),
        ("[ff15::beef]:5000", ("ff15::beef", 5000)),
        ("[ff15::beef]", ("ff15::beef", None)),
    ],
)
def test_parse_group_accepts_v4_and_v6_with_and_without_port(text, expected):
    assert net.parse_group(text) == expected


@pytest.mark.parametrize(
    "text, words",
    [
        ("10.0.0.1", "not a multicast group"),
        ("[::1]:5000", "not a multicast group"),
        ("239.1.2.3:http", "not a number"),
        ("239.1.2.3:70000", "out of range"),
        ("[ff15::1", "missing ']'"),
        ("sensors.local", "not an IP address"),
    ],
)
def test_parse_group_refuses_with_a_reason(text, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        net.parse_group(text)


def test_unicast_port_zero_reads_back_the_real_port_v4_and_v6():
    v4 = net.open_unicast("127.0.0.1", 0, 1 << 20)
    v6 = net.open_unicast("::1", 0, 1 << 20)
    try:
        assert v4.address[0] == "127.0.0.1" and v4.address[1] > 0
        assert v6.address[0] == "::1" and v6.address[1] > 0
        assert v4.label == f"udp 127.0.0.1:{v4.address[1]}"
        assert v6.label == f"udp [::1]:{v6.address[1]}"
        for ep in (v4, v6):
            assert ep.sock.getblocking() is False
            assert ep.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
            assert ep.rcvbuf_granted == ep.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            assert ep.drop_counter is LINUX
        assert v6.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        v4.sock.close()
        v6.sock.close()


def test_port_in_use_is_a_setup_error_even_against_reuseaddr_holders():
    first = net.open_unicast("127.0.0.1", 0, 65536)
    port = first.address[1]
    try:
        with pytest.raises(SetupError, match=f"port {port} is in use"):
            net.open_unicast("127.0.0.1", port, 65536)
        plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a holder without SO_REUSEADDR
        plain.bind(("127.0.0.1", 0))
        try:
            with pytest.raises(SetupError, match="is in use"):
                net.open_unicast("127.0.0.1", plain.getsockname()[1], 65536)
        finally:
            plain.close()
    finally:
        first.sock.close()


def test_address_not_on_this_host_names_the_problem():
    with pytest.raises(SetupError, match="not configured on this host"):
        net.open_unicast("192.0.2.77", 0, 65536)


def test_unresolvable_listen_host():
    with pytest.raises(SetupError, match="cannot resolve listen address"):
        net.open_unicast("no-such-host.invalid", 0, 65536)


def test_rcvbuf_advice_compares_with_twice_the_request():
    assert net.rcvbuf_advice(1000, 2000 if LINUX else 1000) is None
    advice = net.rcvbuf_advice(8 << 20, 425984)
    assert "net.core.rmem_max=8388608" in advice and "granted 425984" in advice


@pytest.mark.skipif(not LINUX, reason="SO_RCVBUF doubling and rmem_max are Linux behaviour")
def test_granted_rcvbuf_is_double_the_request_when_allowed():
    ep = net.open_unicast("127.0.0.1", 0, 1 << 20)
    try:
        assert ep.rcvbuf_granted >= 2 * (1 << 20) or net.rcvbuf_advice(1 << 20, ep.rcvbuf_granted)
    finally:
        ep.sock.close()


def test_unknown_interface_lists_the_real_ones():
    with pytest.raises(SetupError, match=r"unknown interface 'nosuchif0'.*\blo\b"):
        net.Interface.resolve("nosuchif0")


def test_interface_by_address_and_by_name_agree_on_loopback():
    by_addr = net.Interface.resolve("127.0.0.1")
    by_name = net.Interface.resolve("lo")
    assert by_addr.index == by_name.index == socket.if_nametoindex("lo")
    assert by_name.ipv4 == "127.0.0.1"
    assert net.Interface.resolve("::1").index == socket.if_nametoindex("lo")
    with pytest.raises(SetupError, match="no interface has the address 192.0.2.1"):
        net.Interface.resolve("192.0.2.1")


def _v4_sender() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    return s


def _recv_all(sock: socket.socket, expect: int, timeout: float = 3.0) -> list[bytes]:
    import selectors
    import time

    got: list[bytes] = []
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while len(got) < expect and time.monotonic() < deadline:
        if sel.select(0.05):
            try:
                while True:
                    got.append(sock.recv(65536))
            except BlockingIOError:
                pass
    # Anything extra (cross-talk) would already be queued: read it too.
    try:
        while True:
            got.append(sock.recv(65536))
    except BlockingIOError:
        pass
    sel.close()
    return got


@pytest.mark.skipif(not LINUX, reason="IP_MULTICAST_ALL is Linux-only")
def test_two_groups_on_one_port_do_not_cross_talk_and_unicast_wildcard_gets_no_group_traffic():
    """Telegraf #17203: without IP_MULTICAST_ALL=0 each socket would get both groups."""
    lo = net.Interface.resolve("127.0.0.1")
    wildcard = net.open_unicast("0.0.0.0", 0, 65536)  # unicast first, as the Collector does
    port = wildcard.address[1]
    a = net.open_multicast("239.77.0.1", port, lo, 65536)
    b = net.open_multicast("239.77.0.2", port, lo, 65536)
    sender = _v4_sender()
    try:
        assert a.label == f"udp 239.77.0.1:{port} multicast on 127.0.0.1"
        for i in range(5):
            sender.sendto(b"A%d" % i, ("239.77.0.1", port))
            sender.sendto(b"B%d" % i, ("239.77.0.2", port))
        sender.sendto(b"U", ("127.0.0.1", port))
        assert sorted(_recv_all(a.sock, 5)) == [b"A%d" % i for i in range(5)]
        assert sorted(_recv_all(b.sock, 5)) == [b"B%d" % i for i in range(5)]
        assert _recv_all(wildcard.sock, 1) == [b"U"]
    finally:
        for s in (a.sock, b.sock, wildcard.sock, sender):
            s.close()


def test_multicast_join_by_interface_name_v4():
    ep = net.open_multicast("239.77.0.9", 0, net.Interface.resolve("lo"), 65536)
    sender = _v4_sender()
    try:
        sender.sendto(b"x", ("239.77.0.9", ep.address[1]))
        assert _recv_all(ep.sock, 1) == [b"x"]
    finally:
        ep.sock.close()
        sender.close()


def test_link_local_v6_group_needs_an_interface():
    with pytest.raises(ConfigError, match="link-local scope"):
        net.open_multicast("ff02::1234", 0, net.Interface.resolve(None), 65536)


def test_multicast_ipv6_join_on_loopback_or_a_clear_setup_error():
    """Loopback usually lacks the MULTICAST flag for IPv6: then the error must say what to do."""
    try:
        ep = net.open_multicast("ff15::7e1e", 0, net.Interface.resolve("lo"), 65536)
    except SetupError as exc:
        assert "cannot join multicast group ff15::7e1e on lo" in str(exc)
        return
    ep.sock.close()


def test_constants_have_linux_values():
    assert tuning.SO_RXQ_OVFL == 40 and tuning.IP_MULTICAST_ALL == 49 and tuning.SO_RCVBUFFORCE == 33
    if hasattr(socket, "IP_MULTICAST_ALL"):
        assert socket.IP_MULTICAST_ALL == tuning.IP_MULTICAST_ALL


@pytest.fixture
def no_free_fd():
    """Every file descriptor below a lowered RLIMIT_NOFILE taken: socket() fails (EMFILE).

    A real kernel refusal standing in for the one a gateway with IPv6
    compiled out gives for `--listen [::]:4739` (EAFNOSUPPORT)."""
    import errno
    import os
    import resource

    socket.getaddrinfo("127.0.0.1", 0)  # imports the idna codec while a file can still be opened
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 16
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    held = []
    try:
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_socket_the_kernel_refuses_is_a_setup_error_with_a_fixed_port_too(no_free_fd):
    # With a fixed port the probe for another holder runs first; its socket
    # must fail as readably as the listener's own (port 0 skips the probe).
    with pytest.raises(SetupError, match="cannot create an IPv4 UDP socket: Too many open files"):
        net.open_unicast("127.0.0.1", 0)
    with pytest.raises(SetupError, match="cannot create an IPv4 UDP socket: Too many open files"):
        net.open_unicast("127.0.0.1", tuning.DEFAULT_UDP_PORT)


@pytest.mark.skipif(not LINUX, reason="SO_MEMINFO is Linux's")
def test_queue_fill_follows_what_is_queued():
    """queue_fill: bytes charged to the socket's queue over its buffer, 0 when read empty."""
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        r.bind(("127.0.0.1", 0))
        assert net.queue_fill(r) == 0.0
        for _ in range(10):
            s.sendto(b"x" * 70, r.getsockname())
        wait_for(lambda: net.queue_fill(r) > 0, 5, what="the datagrams to be queued")
        ten = net.queue_fill(r)
        granted = r.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert 10 * 70 / granted < ten < 10 * 4096 / granted  # each charged its payload and its overhead
        for _ in range(10):
            r.recv(100)
        assert net.queue_fill(r) == 0.0
    finally:
        r.close()
        s.close()
