"""Targets and sending sockets: parse HOST:PORT, resolve it, set multicast options, count sends.

Everything the simulator and the `Sensor` API need from the network is here,
so both send the same way: a UDP socket connected to each unicast target
(so a port nobody listens on is heard of: ECONNREFUSED) and one per address
family for multicast, IP_MULTICAST_TTL/IPV6_MULTICAST_HOPS from `ttl`, multicast loop on, and the
outgoing multicast interface when one is given.  `Sender.send` counts each
sendto that succeeded and each that failed; a failure the network may recover
from (a full buffer, an unreachable host) is counted and survived, any other
is a SetupError that says what was refused.  A wrong multicast interface is a
ConfigError: the flag is wrong, not the network.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

from collector.config import parse_host_port
from collector.errors import ConfigError, SetupError

# Errors a later sendto may not repeat: counted per errno name, never fatal.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOBUFS",
        "EAGAIN",
        "EWOULDBLOCK",
        "ECONNREFUSED",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "EHOSTDOWN",
        "ENETDOWN",
    )
    if hasattr(errno, name)
)


@dataclass(frozen=True)
class Target:
    label: str  # as the user would write it: 127.0.0.1:4739, [::1]:4739
    family: int
    sockaddr: tuple
    multicast: bool


def resolve(host: str, port: int) -> Target:
    """Resolve one host and port to a Target; ValueError says what is wrong."""
    if not host:
        raise ValueError("a host is required (HOST:PORT)")
    if not 0 < port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ValueError(f"cannot resolve host {host!r}: {reason}") from None
    family, _, _, _, sockaddr = infos[0]
    address = sockaddr[0]
    label = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"
    multicast = ipaddress.ip_address(address.split("%", 1)[0]).is_multicast
    return Target(label, family, sockaddr, multicast)


def parse_target(text: str) -> Target:
    """Parse 'HOST:PORT' or '[V6ADDR]:PORT' (port required) and resolve it."""
    host, port = parse_host_port(text, None)
    if text.strip().startswith(":"):
        raise ValueError(f"{text!r}: a host is required (HOST:PORT)")
    try:
        return resolve(host, port)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def _interface_index(interface: str) -> int:
    if interface.isdigit():
        return int(interface)
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        raise ConfigError(f"multicast interface {interface!r}: no such network interface") from None


def open_socket(family: int, ttl: int = 1, multicast_interface: str | None = None) -> socket.socket:
    """A UDP socket for `family` with the multicast options set (harmless for unicast)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            if multicast_interface:
                try:
                    packed = socket.inet_aton(str(ipaddress.IPv4Address(multicast_interface)))
                except ValueError:
                    # An interface name or index: struct ip_mreqn (Linux) selects by index.
                    index = _interface_index(multicast_interface)
                    packed = struct.pack("4s4si", b"\0" * 4, b"\0" * 4, index)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, packed)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ttl)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
            if multicast_interface:
                try:
                    ipaddress.IPv4Address(multicast_interface)
                except ValueError:
                    pass
                else:
                    raise ConfigError(
                        f"multicast interface {multicast_interface}: IPv6 needs an interface"
                        " name or index (e.g. eth0 or 2), not an IPv4 address"
                    )
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, _interface_index(multicast_interface))
    except OSError as exc:
        sock.close()
        raise SetupError(
            f"cannot set multicast options (ttl={ttl}, interface={multicast_interface}): {exc.strerror}"
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


class Sender:
    """Sends each datagram to every target; counts successes per target and failures per errno."""

    def __init__(self, targets: list[Target], ttl: int = 1, multicast_interface: str | None = None) -> None:
        if not targets:
            raise ValueError("at least one target is required")
        self.targets = list(targets)
        # Each unicast target gets a socket connected to it: only a connected UDP socket hears
        # the ICMP port unreachable of a port nobody listens on (the next send fails with
        # ECONNREFUSED, counted below).  Multicast targets share one socket per family.
        self.sockets: list[socket.socket] = []
        shared: dict[int, socket.socket] = {}
        per_target: list[socket.socket] = []
        try:
            for target in self.targets:
                if not target.multicast:
                    sock = open_socket(target.family, ttl, None)
                    self.sockets.append(sock)
                    try:
                        sock.connect(target.sockaddr)
                    except OSError as exc:
                        if exc.errno not in TRANSIENT_ERRNOS:
                            raise SetupError(f"cannot send to {target.label}: {exc.strerror or exc}") from None
                        # No route now (ENETUNREACH in a namespace whose lo is down): the socket
                        # stays unconnected, so each sendto fails, is counted per errno, and a
                        # target that took nothing is named at the end (exit 1), as before.
                elif target.family not in shared:
                    sock = shared[target.family] = open_socket(target.family, ttl, multicast_interface)
                    self.sockets.append(sock)
                else:
                    sock = shared[target.family]
                per_target.append(sock)
        except BaseException:
            self.close()
            raise
        # sendto with the connected address: the same call for both kinds of socket.
        self._routes = [(sock.sendto, t.sockaddr) for sock, t in zip(per_target, self.targets)]
        self.sent_per_target = [0] * len(self.targets)
        self.sent = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        if len(self._routes) == 1:  # the common case, ~0.5 us cheaper per datagram
            self._sendto0, self._addr0 = self._routes[0]
            self.send = self._send_one  # type: ignore[method-assign]

    def _send_one(self, data: bytes) -> int:
        try:
            self._sendto0(data, self._addr0)
        except OSError as exc:
            self._failed(0, exc)
            return 0
        self.sent += 1
        return 1

    def send(self, data: bytes) -> int:
        """Send `data` to every target; returns how many sendto calls succeeded."""
        ok = 0
        for i, (sendto, addr) in enumerate(self._routes):
            try:
                sendto(data, addr)
            except OSError as exc:
                self._failed(i, exc)
            else:
                ok += 1
                self.sent_per_target[i] += 1
        self.sent += ok
        return ok

    def _failed(self, i: int, exc: OSError) -> None:
        if exc.errno not in TRANSIENT_ERRNOS:
            raise SetupError(f"sendto {self.targets[i].label} failed: {exc.strerror or exc}") from None
        self.failed += 1
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        self.errors[name] = self.errors.get(name, 0) + 1

    def check_pending(self) -> None:
        """Count an error the kernel holds for a connected socket but no send has reported yet
        (the ICMP port unreachable of the last datagram, or of the only one): SO_ERROR reads and
        clears it.  The datagram was sent, so `failed` is unchanged; `errors` records it."""
        for sock in self.sockets:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                name = errno.errorcode.get(code, str(code))
                self.errors[name] = self.errors.get(name, 0) + 1

    def per_target(self) -> dict[str, int]:
        if len(self._routes) == 1:
            return {self.targets[0].label: self.sent}
        return {t.label: n for t, n in zip(self.targets, self.sent_per_target)}

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
