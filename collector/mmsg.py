"""recvmmsg(2) through ctypes: many datagrams per system call (Linux).

`sock.recv` costs a system call and a Python call per datagram; recvmmsg
fills up to `vlen` slots of one reused buffer in one call, and the
datagrams are copied out as bytes (bench/ingest.py measures the loop).
Each slot is `size` bytes, the collector's receive buffer: a datagram longer
than its slot is cut and flagged MSG_TRUNC, exactly as recvmsg flags it.
Each slot also has room for its source address (parsed only when asked for,
to name the source of a rejected datagram) and its ancillary data (the
socket's SO_RXQ_OVFL drop count).

`available()` is False where libc has no recvmmsg (not Linux, or a libc
without it); the collector then reads with recv, as before.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys

from . import tuning

_NAME_BYTES = 32  # a sockaddr_in6 is 28
_CMSG_HEADER = struct.Struct("@NiI")  # cmsghdr: cmsg_len (size_t), cmsg_level, cmsg_type
_CONTROL_BYTES = 32  # CMSG_SPACE(4) is 24 on 64-bit Linux, 16 on 32-bit
_U32 = struct.Struct("=I")
_PORT = struct.Struct("!H")
_FLOWINFO = struct.Struct("!I")


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _libc_recvmmsg():
    if not sys.platform.startswith("linux"):
        return None
    try:
        # PyDLL: the call keeps the GIL.  It never blocks (the sockets are
        # non-blocking) and takes tens of us; released, it handed the GIL to
        # the collector's writer thread at every call, and the loop then
        # waited up to the interpreter's switch interval (5 ms) to get it
        # back: ~64 datagrams per 5 ms while a flush ran (bench/ingest_stalls.py).
        func = ctypes.PyDLL(None, use_errno=True).recvmmsg
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    func.restype = ctypes.c_int
    return func


_recvmmsg = _libc_recvmmsg()


def available() -> bool:
    """Whether this platform's libc has recvmmsg (the collector falls back to recv)."""
    return _recvmmsg is not None


class BatchReceiver:
    """Reads up to `vlen` datagrams of at most `size` bytes per call from one socket."""

    def __init__(self, sock: socket.socket, vlen: int, size: int) -> None:
        if _recvmmsg is None:
            raise OSError(errno.ENOSYS, "recvmmsg is not available here")
        self.sock = sock
        self.vlen = vlen
        self.size = size
        # Pages of the data buffer the kernel never writes are never resident:
        # a 64-slot buffer of 64 KiB slots costs ~one page per slot in use.
        self._data = bytearray(vlen * size)
        self._view = memoryview(self._data)
        data_at = ctypes.addressof((ctypes.c_char * len(self._data)).from_buffer(self._data))
        self._names = ctypes.create_string_buffer(vlen * _NAME_BYTES)
        self._control = ctypes.create_string_buffer(vlen * _CONTROL_BYTES)
        self._iovecs = (_Iovec * vlen)(*(_Iovec(data_at + i * size, size) for i in range(vlen)))
        self._msgs = (_Mmsghdr * vlen)()
        names_at = ctypes.addressof(self._names)
        control_at = ctypes.addressof(self._control)
        for i, m in enumerate(self._msgs):
            h = m.msg_hdr
            h.msg_name = names_at + i * _NAME_BYTES
            h.msg_namelen = _NAME_BYTES
            h.msg_iov = ctypes.addressof(self._iovecs[i])
            h.msg_iovlen = 1
            h.msg_control = control_at + i * _CONTROL_BYTES
            h.msg_controllen = _CONTROL_BYTES
        # The kernel overwrites lengths and flags: one copy of this template
        # before each call puts them back.
        self._template = bytes(self._msgs)
        self._msgs_at = ctypes.addressof(self._msgs)
        words = memoryview(self._msgs).cast("B").cast("I")  # type: ignore[arg-type]
        stride = ctypes.sizeof(_Mmsghdr) // 4
        self._lens = words[_Mmsghdr.msg_len.offset // 4 :: stride]
        self._flags = words[(_Mmsghdr.msg_hdr.offset + _Msghdr.msg_flags.offset) // 4 :: stride]
        sizes = memoryview(self._msgs).cast("B").cast("N")  # type: ignore[arg-type]
        step = ctypes.sizeof(_Mmsghdr) // ctypes.sizeof(ctypes.c_size_t)
        self._controllens = sizes[_Msghdr.msg_controllen.offset // ctypes.sizeof(ctypes.c_size_t) :: step]
        self._offsets = range(0, vlen * size, size)
        self._slots: list[int] | None = None  # slot of each datagram returned, when some were cut

    def receive(self, limit: int | None = None) -> tuple[list[bytes], int, int | None]:
        """(datagrams, how many were cut and left out, the newest drop count or None).

        An empty list when nothing is queued.  Raises OSError for any other
        failure than EAGAIN/EINTR.  The source addresses of the datagrams
        returned can be read with `address(i)` until the next call.
        """
        n_max = self.vlen if limit is None else max(1, min(limit, self.vlen))
        ctypes.memmove(self._msgs_at, self._template, len(self._template))
        n = _recvmmsg(self.sock.fileno(), self._msgs_at, n_max, socket.MSG_DONTWAIT, None)
        if n <= 0:
            if n == 0:
                return [], 0, None
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return [], 0, None
            raise OSError(err, os.strerror(err))
        view = self._view
        lens = self._lens[:n].tolist()
        datas = [bytes(view[o : o + k]) for o, k in zip(self._offsets, lens)]
        cut = 0
        drops = None
        self._slots = None
        if any(self._flags[:n]):  # MSG_TRUNC (cut), MSG_CTRUNC, ...: the rare case
            keep = []
            for i, flags in enumerate(self._flags[:n].tolist()):
                if flags & socket.MSG_TRUNC:
                    cut += 1
                else:
                    keep.append(i)
            if cut:
                datas = [datas[i] for i in keep]
                self._slots = keep
        # The drop count is cumulative: the newest datagram that carries one
        # has the latest (the kernel adds it once the socket has dropped any).
        controllens = self._controllens[:n]
        if any(controllens):
            for i in range(n - 1, -1, -1):
                if controllens[i] >= _CMSG_HEADER.size + 4:
                    drops = self._drops(i)
                    if drops is not None:
                        break
        return datas, cut, drops

    def _drops(self, i: int) -> int | None:
        at = i * _CONTROL_BYTES
        length, level, kind = _CMSG_HEADER.unpack_from(self._control, at)
        if level == socket.SOL_SOCKET and kind == tuning.SO_RXQ_OVFL and length >= _CMSG_HEADER.size + 4:
            return _U32.unpack_from(self._control, at + _CMSG_HEADER.size)[0]
        return None

    def address(self, i: int) -> tuple | None:
        """The source (host, port[, flowinfo, scope_id]) of datagram i of the last call."""
        slot = i if self._slots is None else self._slots[i]
        at = slot * _NAME_BYTES
        raw = self._names.raw[at : at + _NAME_BYTES]
        family = int.from_bytes(raw[:2], sys.byteorder)
        (port,) = _PORT.unpack_from(raw, 2)
        if family == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
        if family == socket.AF_INET6:
            (flowinfo,) = _FLOWINFO.unpack_from(raw, 4)
            (scope,) = _U32.unpack_from(raw, 24)
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flowinfo, scope
        return None


class Addresses:
    """The source addresses of one call's datagrams, by index (read lazily)."""

    __slots__ = ("_receiver", "_n")

    def __init__(self, receiver: BatchReceiver, n: int) -> None:
        self._receiver = receiver
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple | None:
        return self._receiver.address(i)
