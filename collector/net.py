"""Socket set-up for the collector: unicast and multicast UDP, IPv4 and IPv6.

Every socket the collector reads is made here, non-blocking, with
SO_REUSEADDR, the largest receive buffer the kernel grants, and the kernel's
drop counter (SO_RXQ_OVFL) switched on where Linux offers it.  Multicast
sockets bind to their group, turn IP_MULTICAST_ALL off (so two groups on one
port do not cross-talk, Telegraf #17203) and join on the interface asked for.
Whatever the kernel refuses becomes a SetupError whose message says what to
change, in the manner of zeroconf's _utils/net.py; nothing here reads or
writes datagrams.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import socket
import struct
import sys
from dataclasses import dataclass

from . import tuning
from .errors import ConfigError, SetupError

log = logging.getLogger("collector.net")

IS_LINUX = sys.platform.startswith("linux")
SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address


@dataclass
class Endpoint:
    """One bound socket and what an operator needs to know about it."""

    sock: socket.socket
    label: str  # "udp 127.0.0.1:4739" or "udp [ff15::1]:4739 multicast on eth0"
    address: tuple  # getsockname(): the real port even when 0 was asked
    rcvbuf_requested: int
    rcvbuf_granted: int
    drop_counter: bool  # SO_RXQ_OVFL is on: ancillary data carries kernel drops


def format_address(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- parsing -----------------------------------------------------------------------------


def parse_group(text: str) -> tuple[str, int | None]:
    """Parse a multicast GROUP or GROUP:PORT ([V6GROUP]:PORT); port None = default.

    Raises ConfigError when the address is not a multicast group.
    """
    raw = text.strip()
    port: int | None = None
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise ConfigError(f"multicast group {text!r}: missing ']'")
        host, rest = raw[1:end], raw[end + 1 :]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ConfigError(f"multicast group {text!r}: expected [GROUP]:PORT")
            port = int(rest[1:])
    elif raw.count(":") > 1:
        host = raw  # a bare IPv6 group without a port
    elif ":" in raw:
        host, port_text = raw.rsplit(":", 1)
        if not port_text.isdigit():
            raise ConfigError(f"multicast group {text!r}: port {port_text!r} is not a number")
        port = int(port_text)
    else:
        host = raw
    if port is not None and not 0 < port <= 65535:
        raise ConfigError(f"multicast group {text!r}: port {port} is out of range 1-65535")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"multicast group {text!r}: {host!r} is not an IP address") from None
    if not address.is_multicast:
        raise ConfigError(f"{host} is not a multicast group (IPv4 224.0.0.0/4 or IPv6 ff00::/8)")
    return str(address), port


# --- receive buffer and drop counter -------------------------------------------------------


def set_rcvbuf(sock: socket.socket, requested: int) -> int:
    """Ask for `requested` bytes of receive buffer; returns what the kernel granted.

    Linux doubles the value set (for bookkeeping overhead) and reports the
    doubled figure, capped at 2 x net.core.rmem_max; SO_RCVBUFFORCE lifts the
    cap for a process with CAP_NET_ADMIN, so it is tried first.
    """
    if IS_LINUX:
        try:
            sock.setsockopt(socket.SOL_SOCKET, tuning.SO_RCVBUFFORCE, requested)
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        except OSError:
            pass  # no CAP_NET_ADMIN: the capped request below is the best we get
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, requested)
    except OSError as exc:
        log.warning("SO_RCVBUF %d refused: %s", requested, exc.strerror)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def rcvbuf_advice(requested: int, granted: int) -> str | None:
    """One line for the log when the kernel granted less than asked, else None."""
    expected = 2 * requested if IS_LINUX else requested
    if granted >= expected:
        return None
    return (
        f"receive buffer capped: asked {requested} bytes, kernel granted {granted} "
        f"(Linux reports double the usable size); raise the cap with "
        f"'sysctl -w net.core.rmem_max={requested}' (persist it in /etc/sysctl.d/) "
        f"or run with CAP_NET_ADMIN, else bursts are dropped in the kernel (see kernel_drops)"
    )


def enable_drop_counter(sock: socket.socket) -> bool:
    """Turn on SO_RXQ_OVFL so recvmsg reports the socket's cumulative drops."""
    if not IS_LINUX:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, tuning.SO_RXQ_OVFL, 1)
    except OSError:
        return False
    return True


def _meminfo(sock: socket.socket, fields: int) -> tuple[int, ...] | None:
    """The first `fields` u32 of the socket's SO_MEMINFO (linux/sock_diag.h), or None."""
    if not IS_LINUX:
        return None
    size = 4 * fields
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, tuning.SO_MEMINFO, size)
    except OSError:
        return None
    if len(raw) < size:
        return None
    return struct.unpack_from(f"={fields}I", raw)


def read_drops(sock: socket.socket) -> int | None:
    """The socket's cumulative kernel drop count now (SO_MEMINFO), or None if unavailable.

    SO_RXQ_OVFL reports the same counter, but only in the ancillary data of
    the next datagram queued after the drops; this reads it at any time, so
    drops at the end of a burst are accounted without waiting for traffic.
    """
    info = _meminfo(sock, tuning.SK_MEMINFO_DROPS + 1)
    return None if info is None else info[tuning.SK_MEMINFO_DROPS]


def queue_fill(sock: socket.socket) -> float | None:
    """How full the socket's receive queue is now: bytes charged over the buffer
    granted (SO_MEMINFO rmem_alloc / rcvbuf), or None if unavailable."""
    info = _meminfo(sock, 2)
    if info is None or not info[1]:
        return None
    return info[0] / info[1]


# --- interfaces ----------------------------------------------------------------------------


def _interface_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        names = ", ".join(n for _, n in socket.if_nameindex())
        raise SetupError(f"unknown interface {name!r} for --multicast-interface (this host has: {names})") from None


def _ipv4_of_interface(name: str) -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        return None
    finally:
        probe.close()


def _index_of_ipv4(address: str) -> int:
    for index, name in socket.if_nameindex():
        if _ipv4_of_interface(name) == address:
            return index
    raise SetupError(f"no interface has the address {address} (--multicast-interface): check 'ip -4 addr'")


def _index_of_ipv6(address: str) -> int:
    wanted = ipaddress.IPv6Address(address).packed.hex()
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == wanted:
                    return int(fields[1], 16)
    except OSError:
        pass
    raise SetupError(f"no interface has the address {address} (--multicast-interface): check 'ip -6 addr'")


@dataclass(frozen=True)
class Interface:
    """A multicast interface as given: an address, a name, or None (kernel's choice)."""

    text: str | None
    index: int  # 0 = let the kernel choose by route
    ipv4: str | None  # the interface's IPv4 address, when known

    @classmethod
    def resolve(cls, text: str | None) -> Interface:
        if not text:
            return cls(None, 0, None)
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            index = _interface_index(text)
            return cls(text, index, _ipv4_of_interface(text))
        if address.version == 4:
            return cls(text, _index_of_ipv4(text), text)
        return cls(text, _index_of_ipv6(text), None)

    def describe(self) -> str:
        return self.text or "the default interface"


# --- errno -> advice -----------------------------------------------------------------------


def _bind_error(exc: OSError, label: str, port: int) -> SetupError:
    code = exc.errno
    if code == errno.EADDRINUSE:
        hint = f"port {port} is in use: is another collector running? ('ss -ulpn sport = :{port}' names it)"
    elif code == errno.EADDRNOTAVAIL:
        hint = "that address is not configured on this host ('ip addr' lists them)"
    elif code == errno.EACCES:
        hint = f"ports below 1024 need root or CAP_NET_BIND_SERVICE; use {tuning.DEFAULT_UDP_PORT}"
    elif code == errno.EAFNOSUPPORT:
        hint = "IPv6 is disabled on this host"
    else:
        hint = exc.strerror or str(exc)
    return SetupError(f"cannot bind {label}: {hint}")


def _join_error(exc: OSError, group: str, interface: Interface) -> SetupError:
    code = exc.errno
    where = interface.describe()
    if code == errno.ENODEV:
        hint = f"no route for multicast via {where}: pick one with --multicast-interface, or add a route for the group"
    elif code == errno.EADDRNOTAVAIL:
        hint = f"{where} has no such address or is down ('ip addr')"
    elif code == errno.ENOBUFS:
        hint = "too many memberships: raise net.ipv4.igmp_max_memberships (or net.ipv6.mld_max_msf)"
    elif code == errno.EINVAL:
        hint = "the kernel refused the group (is it a multicast address of the right family?)"
    elif code == errno.EADDRINUSE:
        hint = "this socket already joined the group"
    else:
        hint = exc.strerror or str(exc)
    return SetupError(f"cannot join multicast group {group} on {where}: {hint}")


# --- sockets -------------------------------------------------------------------------------


def _udp_socket(family: int) -> socket.socket:
    try:
        return socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        kind = "IPv6" if family == socket.AF_INET6 else "IPv4"
        raise SetupError(f"cannot create an {kind} UDP socket: {exc.strerror}") from None


def _new_socket(family: int) -> socket.socket:
    sock = _udp_socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # [::]:P must not also take 0.0.0.0:P: an IPv4 listener may want it.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if IS_LINUX:
        # With IP_MULTICAST_ALL on (Linux's default) a socket bound to the
        # wildcard receives every group any socket on the host joined on its
        # port: a unicast listener on 0.0.0.0:4739 would get each multicast
        # datagram a second time.  Off, a socket gets only groups it joined.
        try:
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_MULTICAST_ALL", tuning.IP_MULTICAST_ALL), 0)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, tuning.IPV6_MULTICAST_ALL, 0)
        except OSError:
            pass  # IPv6 before kernel 4.20: multicast sockets bind to their group instead
    sock.setblocking(False)
    return sock


def _probe_unused(family: int, sockaddr: tuple, label: str, port: int) -> None:
    """Fail if another socket holds the port, even one with SO_REUSEADDR.

    Two UDP sockets that both set SO_REUSEADDR may bind the same address on
    Linux, and the kernel then hands each unicast datagram to only one of
    them: a second collector would silently take half the traffic.  A bind
    without SO_REUSEADDR conflicts with any holder, so it answers "in use?".
    """
    probe = _udp_socket(family)  # IPv6 compiled out (EAFNOSUPPORT) shows here first
    try:
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(sockaddr)
    except OSError as exc:
        raise _bind_error(exc, label, port) from None
    finally:
        probe.close()


def _finish(sock: socket.socket, label: str, rcvbuf: int) -> Endpoint:
    granted = set_rcvbuf(sock, rcvbuf)
    advice = rcvbuf_advice(rcvbuf, granted)
    if advice:
        log.warning("%s: %s", label, advice)
    drops = enable_drop_counter(sock)
    return Endpoint(sock, label, sock.getsockname(), rcvbuf, granted, drops)


def open_unicast(host: str, port: int, rcvbuf: int = tuning.DEFAULT_RCVBUF_BYTES) -> Endpoint:
    """Bind a UDP socket to host:port (a name, an IPv4 or an IPv6 address)."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SetupError(f"cannot resolve listen address {host!r}: {reason}") from None
    family, _, _, _, sockaddr = infos[0]
    wanted = format_address(sockaddr)
    if port:
        _probe_unused(family, sockaddr, f"udp {wanted}", port)
    sock = _new_socket(family)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise _bind_error(exc, f"udp {wanted}", port) from None
    bound = sock.getsockname()
    try:
        return _finish(sock, f"udp {format_address(bound)}", rcvbuf)
    except BaseException:
        sock.close()
        raise


def _multicast_scope_needs_interface(group: ipaddress.IPv6Address) -> bool:
    return (group.packed[1] & 0x0F) in (1, 2)  # interface- and link-local scopes


def open_multicast(group: str, port: int, interface: Interface, rcvbuf: int = tuning.DEFAULT_RCVBUF_BYTES) -> Endpoint:
    """Bind a UDP socket to group:port and join the group on `interface`.

    The socket is bound to the group address, not the wildcard, so unicast
    datagrams to the same port never land here; IP_MULTICAST_ALL off makes it
    receive only the group it joined, even if another socket on this host
    joined a different group on the same port.
    """
    address = ipaddress.ip_address(group)
    if not address.is_multicast:
        raise ConfigError(f"{group} is not a multicast group (IPv4 224.0.0.0/4 or IPv6 ff00::/8)")
    where = f" on {interface.text}" if interface.text else ""
    if address.version == 4:
        sock = _new_socket(socket.AF_INET)
        label = f"udp {group}:{port} multicast{where}"
        try:
            sock.bind((group, port))
        except OSError as exc:
            sock.close()
            raise _bind_error(exc, label, port) from None
        try:
            if interface.index and interface.ipv4 is None:
                # struct ip_mreqn: group, local address (any), interface index
                mreq = address.packed + bytes(4) + struct.pack("@i", interface.index)
            else:
                # struct ip_mreq: group, interface address (0.0.0.0 = by route)
                mreq = address.packed + socket.inet_aton(interface.ipv4 or "0.0.0.0")
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        except OSError as exc:
            sock.close()
            raise _join_error(exc, group, interface) from None
    else:
        if _multicast_scope_needs_interface(address) and not interface.index:
            raise ConfigError(f"{group} is link-local scope: name the interface with --multicast-interface")
        sock = _new_socket(socket.AF_INET6)
        label = f"udp [{group}]:{port} multicast{where}"
        scope = interface.index if _multicast_scope_needs_interface(address) else 0
        try:
            sock.bind((group, port, 0, scope))
        except OSError as exc:
            sock.close()
            raise _bind_error(exc, label, port) from None
        try:
            # struct ipv6_mreq: group, interface index (0 = by route)
            mreq = address.packed + struct.pack("@I", interface.index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        except OSError as exc:
            sock.close()
            raise _join_error(exc, group, interface) from None
    try:
        return _finish(sock, label, rcvbuf)
    except BaseException:
        sock.close()
        raise
