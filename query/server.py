"""The TLS listener: one selectors loop, non-blocking TLS, JSON lines in and out.

Promises: no client can delay another by being slow, silent, half-open or not
speaking TLS at all, because every socket is non-blocking and the handshake is
driven by readiness events (SSLWantRead/WriteError), never by a blocking call;
every connection's memory is bounded (a request line by MAX_LINE_BYTES, queued
output by `max_output` plus one response: a client that stops reading stops
being read); SQL runs on worker threads with their own read-only
connections, one request in flight per connection, so a long query holds a
worker and never the loop; a request that fails inside answers `internal`
and is logged, never ending the loop.  Requests are answered in order, one
response per line.
Shaped like socketserver: `serve_forever()` / `shutdown()` (thread- and
signal-safe, via a wake-up socketpair), port 0 read back in `server_address`.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from collector.errors import SetupError

from . import tuning
from .follow import FollowSource, encode_event, matching
from .ops import Ops, ping
from .protocol import (
    MAX_LINE_BYTES,
    STREAM_OPS,
    LineBuffer,
    LineTooLong,
    Request,
    RequestError,
    encode_error,
    encode_id,
    encode_result,
    parse_request,
)
from .stats import QueryStats

log = logging.getLogger("telemetry.query")

READ_CHUNK = 64 * 1024  # bytes per recv; one TLS record is at most 16 KiB anyway
SEND_CHUNK = 256 * 1024
READS_PER_TURN = 8  # recv calls for one client before others get a turn (fairness)
READ_AHEAD_BYTES = MAX_LINE_BYTES  # input buffered while a connection waits for its answer
TURN_SECONDS = 0.005  # work for one client before others get a turn (at least one request)
SWEEP_SECONDS = 0.25  # how often timeouts are checked
LINGER_SECONDS = 2.0  # after too_large or a failed handshake: how long we drain a client's input
# ... and how much of it: a client that reads our answer has sent little more
# by then; one that blasts on would keep the loop copying for LINGER_SECONDS.
LINGER_MAX_BYTES = 1024 * 1024
WORKER_JOIN_SECONDS = 10.0  # shutdown waits this long for a worker's running query
ACCEPT_PAUSE_SECONDS = 0.5  # after accept() fails (EMFILE): stop accepting this long
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets and frees the send buffer
FOLLOW_HEARTBEAT_SECONDS = 30.0  # a follower with nothing new gets a heartbeat event this often


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int = tuning.MAX_CONNECTIONS
    idle_timeout: float = tuning.IDLE_TIMEOUT_S
    handshake_timeout: float = tuning.HANDSHAKE_TIMEOUT_S
    line_timeout: float = tuning.LINE_TIMEOUT_S
    max_output: int = tuning.MAX_OUTPUT_BYTES
    # Unsent response bytes of all connections together: past it the
    # connection holding the most is closed (issue 13.3; see query/tuning.py).
    output_budget: int = tuning.OUTPUT_BUDGET_BYTES


@dataclass
class ServerStats:
    """What the loop counts (tests read it; logs and metrics may too). Touched by the loop thread only."""

    requests: Counter = field(default_factory=Counter)  # answered requests by op ("invalid" for bad lines)
    jobs_submitted: int = 0  # requests that needed a worker
    jobs_run: int = 0  # requests a worker ran
    jobs_dropped: int = 0  # requests dropped unrun because their connection was gone
    resets: int = 0  # connections the peer reset (RST), noticed while they were open
    interrupted: int = 0  # running queries stopped (sqlite3 interrupt) because their connection closed
    evicted: int = 0  # connections closed for holding too much unread output (see output_budget)
    follow_dropped: int = 0  # followers closed for not reading their events (max_output)


def _peer_reset(sock: socket.socket) -> bool:
    """True when the kernel says the peer reset the connection (RST), not merely half-closed it (FIN).

    TLS reports both as end of input (OP_IGNORE_UNEXPECTED_EOF); a half-closed
    client still wants its answers, a reset one is gone.  Linux's TCP_INFO
    tells them apart: after a RST the socket is CLOSE, after a FIN CLOSE_WAIT.
    """
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except (AttributeError, OSError):  # not Linux, or already closed
        return False
    return state == _TCP_CLOSE


_TCP_CLOSE = 7  # include/net/tcp_states.h


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """TLS 1.2+ with forward-secret AEAD ciphers only; mutual TLS when client_ca is given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2 suites; TLS 1.3 suites are all AEAD already and set separately by OpenSSL.
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    # A client that half-closes TCP after its last request (printf ... | openssl
    # s_client) still gets its answers: OpenSSL 3 would otherwise fail the
    # whole connection on the FIN and refuse to write.
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)

    def no_passphrase() -> bytes:
        raise SetupError(f"private key {key} is encrypted: give an unencrypted key readable only by this service")

    # ssl's OSError carries no filename: find which of the two it was.
    try:
        ctx.load_cert_chain(cert, key, password=no_passphrase)
    except FileNotFoundError as exc:
        missing = exc.filename or next((p for p in (cert, key) if not os.path.exists(p)), f"{cert} or {key}")
        raise SetupError(f"cannot read {missing}: no such file (check --cert/--key)") from None
    except PermissionError as exc:
        denied = exc.filename or next((p for p in (cert, key) if not os.access(p, os.R_OK)), f"{cert} or {key}")
        raise SetupError(f"cannot read {denied}: permission denied (the service user must read it)") from None
    except ssl.SSLError as exc:
        # Never include key material; OpenSSL's reason is enough.
        raise SetupError(
            f"cannot load --cert {cert} / --key {key}: {exc.reason or 'not a PEM certificate and matching key'}"
        ) from None
    if client_ca is not None:
        # create_default_context(CLIENT_AUTH) leaves CERT_NONE: without this line
        # a client with no certificate would be let in.
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise SetupError(f"cannot load --client-ca {client_ca}: {getattr(exc, 'strerror', None) or exc}") from None
    return ctx


class Service:
    """Turns request lines into response lines (bytes in, bytes out).

    `parse` runs in the loop (pure and cheap); `answer` runs the SQL on a
    worker's own Ops (its own read-only connection), made by `make_ops`.
    """

    def __init__(self, make_ops: Callable[[], Ops], workers: int = 2) -> None:
        self.make_ops = make_ops
        self.workers = workers
        self.stats = QueryStats()  # requests by op and code, latency (query/stats.py)

    def parse(self, line: bytes) -> Request | bytes:
        """The request, or the error response when the line is not a valid one."""
        started = time.perf_counter()
        try:
            return parse_request(line)
        except RequestError as exc:
            self.stats.request("", exc.code, time.perf_counter() - started)
            return encode_error(exc.request_id, exc.code, exc.message)

    @staticmethod
    def needs_database(request: Request) -> bool:
        return request.op != "ping"

    def answer_inline(self, request: Request) -> bytes:
        """Answer an op that needs no database (ping) in the loop itself."""
        started = time.perf_counter()
        answer = encode_result(request.id, ping())
        self.stats.request(request.op, "ok", time.perf_counter() - started)
        return answer

    def answer(self, ops: Ops | None, request: Request) -> bytes:
        started = time.perf_counter()
        code = "ok"
        try:
            if ops is None:
                raise RuntimeError("no database connection (see the error logged when the worker started)")
            result = ops.run(request)
            return encode_result(request.id, result, ops.meta)
        except RequestError as exc:
            code = exc.code
            return encode_error(request.id, exc.code, exc.message)
        except Exception:  # a bug or a database fault: answer, log, keep serving
            code = "internal"
            log.exception("internal error answering op %r", request.op)
            return encode_error(request.id, "internal", "internal error; the server log has details")
        finally:
            self.stats.request(request.op, code, time.perf_counter() - started)


_HANDSHAKE, _OPEN, _CLOSING = "handshake", "open", "closing"


class _Answered(NamedTuple):
    full: bool  # stopped because the output reached max_output
    turn_over: bool  # stopped because this client's turn (TURN_SECONDS) is used up


class _Conn:
    __slots__ = (
        "sock",
        "peer",
        "state",
        "lines",
        "out",
        "out_bytes",
        "out_offset",
        "accepted",
        "touched",
        "eof",
        "events",
        "want",
        "busy",
        "partial_since",
        "drained",
        "closed",
        "follow",
    )

    def __init__(self, sock: ssl.SSLSocket, peer: str, now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.state = _HANDSHAKE
        self.lines = LineBuffer(MAX_LINE_BYTES)
        self.out: deque[bytes] = deque()
        self.out_bytes = 0
        self.out_offset = 0  # bytes of out[0] already sent
        self.accepted = now
        self.touched = now
        self.eof = False
        self.events = 0  # what the selector currently watches (0: not registered)
        self.want = 0  # what TLS asked for last
        self.busy = False  # a request of this connection is with a worker: answers stay in order
        self.partial_since: float | None = None  # when the unfinished line now buffered began
        self.drained = 0  # bytes discarded while lingering (bounded by LINGER_MAX_BYTES)
        self.closed = False  # dropped: its queued request is never run (read by workers too)
        self.follow: _Follower | None = None  # set while the connection follows the ingest log


@dataclass(eq=False)
class _Follower:
    id_json: str  # the follow request's id, encoded once
    sensor: str | None
    metric: str | None
    position: int  # the last ingest_log id handled for this follower
    pushed: float  # when an event was last queued (for heartbeats)


class QueryServer:
    def __init__(
        self,
        context: ssl.SSLContext,
        address: tuple[str, int],
        service: Service,
        limits: ServerLimits = ServerLimits(),
        notify: Callable[[str], None] = lambda state: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.context = context
        self.service = service
        self.limits = limits
        self.notify = notify
        self._clock = clock
        self._listener = _listen(*address)
        self.server_address = self._listener.getsockname()[:2]
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, "listener")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conns: dict[int, _Conn] = {}
        self._ready: set[int] = set()  # conns with TLS data already decrypted (no readiness event will come)
        self._stop = False
        self._refused = 0
        self.stats = ServerStats()
        # Requests that need SQL go to worker threads, one in flight per
        # connection, so a long query delays neither handshakes nor pings nor
        # other clients; answers come back through _done and a wake-up.
        # Each connection has at most one request waiting in _runnable, and
        # the loop hands a worker the oldest one only when a worker is free:
        # connections take turns (round robin: a connection's next request
        # joins the back), and a request whose connection closed meanwhile
        # is dropped there, never run.  _jobs holds at most `workers` jobs.
        self._runnable: deque[tuple[_Conn, Request]] = deque()
        self._in_flight = 0
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: deque[tuple[_Conn, bytes | None]] = deque()
        self._workers: list[threading.Thread] = []
        # What each worker runs now, {worker: (conn, ops)}: closing a connection
        # interrupts its running query (sqlite3_interrupt is thread-safe) instead
        # of letting it use its whole query-timeout for a peer that is gone.
        self._running: dict[int, tuple[_Conn, Ops | None]] = {}
        for i in range(max(1, service.workers)):  # joined by close()
            worker = threading.Thread(target=self._work, args=(i,), name=f"query-worker-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self._accept_paused_until: float | None = None
        self._closed = False
        self._out_total = 0  # unsent response bytes of all connections (bounded by output_budget)
        self._followers: set[_Conn] = set()
        # The one ingest log reader for every follower (a thread with its own
        # read-only connection, polling on its own timer).
        self._follow = FollowSource(lambda: service.make_ops().conn, self._wake)
        self._follow.start()

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def refused(self) -> int:
        """Connections closed at once because max-connections were open."""
        return self._refused

    def buffered_output(self) -> int:
        """The most response bytes queued for any one client (bounded by max_output + one response)."""
        return max((c.out_bytes for c in list(self._conns.values())), default=0)

    def describe(self) -> str:
        host, port = self.server_address
        host = f"[{host}]" if ":" in host else host
        return f"listening tls {host}:{port}"

    def shutdown(self) -> None:
        """Ask serve_forever to return; safe from another thread or a signal handler."""
        self._stop = True
        self._wake()

    def serve_forever(self) -> None:
        self.notify("READY=1")
        next_sweep = self._clock() + SWEEP_SECONDS
        try:
            while not self._stop:
                timeout = 0 if self._ready else max(0.0, next_sweep - self._clock())
                for key, _events in self._sel.select(timeout):
                    if key.data == "listener":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                        self._collect_answers()
                        self._collect_follow()
                    else:
                        conn = self._conns.get(key.fd)
                        if conn is not None:
                            self._service(conn)
                for fd in list(self._ready):
                    self._ready.discard(fd)
                    conn = self._conns.get(fd)
                    if conn is not None:
                        self._service(conn)
                if self._out_total > self.limits.output_budget:
                    self._evict()
                now = self._clock()
                if now >= next_sweep:
                    self._sweep(now)
                    self.notify("WATCHDOG=1")  # the loop is alive (systemd WatchdogSec=)
                    next_sweep = now + SWEEP_SECONDS
        finally:
            self.notify("STOPPING=1")
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._follow.close()
        # Requests still queued belong to connections just closed: running them
        # would only delay the stop (one query-timeout each, per worker).
        self._runnable.clear()
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(WORKER_JOIN_SECONDS)  # a running query ends within its budget (--query-timeout)
            if worker.is_alive():
                log.warning("%s still running a query at shutdown; leaving it (daemon thread)", worker.name)
        for sock in (self._listener, self._wake_r, self._wake_w):
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self._sel.close()

    # -- loop internals ------------------------------------------------------

    def _work(self, index: int) -> None:
        try:
            ops = self.service.make_ops()
        except Exception:  # the database went away: answer `internal`, say why once
            log.exception("worker cannot open the database")
            ops = None
        try:
            while (job := self._jobs.get()) is not None:
                conn, request = job
                self._running[index] = (conn, ops)
                try:
                    # Closed since the loop handed it over: the peer is gone, skip the SQL.
                    answer = None if conn.closed else self.service.answer(ops, request)
                finally:
                    del self._running[index]
                self._done.append((conn, answer))
                self._wake()
        finally:
            if ops is not None:
                ops.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"w")
        except OSError:  # full: a wake-up is pending anyway
            pass

    def _collect_answers(self) -> None:
        while self._done:
            conn, data = self._done.popleft()
            self._in_flight -= 1
            if data is None:
                self.stats.jobs_dropped += 1
            else:
                self.stats.jobs_run += 1
            if conn.closed:
                continue  # closed while its query ran
            conn.busy = False
            self._queue(conn, data)
            self._service(conn)
        self._dispatch()

    def _submit(self, conn: _Conn, request: Request) -> None:
        conn.busy = True
        self.stats.jobs_submitted += 1
        self._runnable.append((conn, request))
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand waiting requests to free workers, oldest first, skipping those of closed connections."""
        while self._runnable and self._in_flight < len(self._workers):
            conn, request = self._runnable.popleft()
            if conn.closed:
                self.stats.jobs_dropped += 1
                continue
            self._in_flight += 1
            self._jobs.put((conn, request))

    # -- follow ---------------------------------------------------------------

    def _follow_request(self, conn: _Conn, request: Request) -> bytes:
        """Answer follow/cancel in the loop (no SQL: the reader thread knows the head)."""
        rid = request.id
        if request.op == "cancel":
            if conn.follow is None:
                return encode_error(rid, "bad_request", "this connection is not following: nothing to cancel")
            position = conn.follow.position
            self._unfollow(conn)
            return encode_result(rid, {"cancelled": True, "position": position})
        if conn.follow is not None:
            return encode_error(rid, "bad_request", "this connection already follows; send cancel first")
        head = self._follow.head
        if head is None:
            return encode_error(
                rid,
                "bad_request",
                "this database has no ingest log to follow (the collector writes one from storage v3 on)",
            )
        after = request.params.get("after", head)
        if after > head:
            return encode_error(rid, "bad_request", f"parameter 'after' is beyond the newest position {head}")
        conn.follow = _Follower(
            encode_id(rid), request.params.get("sensor"), request.params.get("metric"), after, self._clock()
        )
        self._followers.add(conn)
        self._follow.floor = min(c.follow.position for c in self._followers)
        return encode_result(rid, {"following": True, "position": after})

    def _unfollow(self, conn: _Conn) -> None:
        conn.follow = None
        self._followers.discard(conn)
        self._follow.floor = min((c.follow.position for c in self._followers), default=None)

    def _collect_follow(self) -> None:
        """Queue a batch the reader thread finished to every follower it concerns."""
        batch = self._follow.take()
        if not batch:
            return
        now = self._clock()
        for conn in list(self._followers):
            sub = conn.follow
            if sub is None:  # dropped while serving another follower
                continue
            for entry in batch:
                if entry.id <= sub.position:
                    continue
                if entry.id != sub.position + 1:  # rows deleted before this follower read them
                    self._queue(conn, encode_event(sub.id_json, "lost", entry.id - 1, after=sub.position))
                sub.position = entry.id
                rows = matching(entry.rows, sub.sensor, sub.metric)
                if rows:
                    self._queue(conn, encode_event(sub.id_json, "readings", entry.id, rows))
                    sub.pushed = now
            if conn.out_bytes > self.limits.max_output:
                self._drop_slow_follower(conn)
            else:
                self._service(conn)
        self._follow.floor = min((c.follow.position for c in self._followers), default=None)

    def _drop_slow_follower(self, conn: _Conn) -> None:
        """A follower that does not read its events: replace what it has not been sent by the reason, close."""
        log.warning(
            "%s: follow dropped: %d bytes of events unread (more than max-output %d); the client is not keeping up",
            conn.peer,
            conn.out_bytes,
            self.limits.max_output,
        )
        self.stats.follow_dropped += 1
        # out[0] stays: it may be partly sent, and OpenSSL wants a write it
        # refused (SSLWantWriteError) retried with the same bytes.
        while len(conn.out) > 1:
            self._unqueue(conn, len(conn.out.pop()))
        self._queue(
            conn, encode_error(None, "slow_consumer", "follow dropped: the client did not read its events; closing")
        )
        self._unfollow(conn)
        conn.state = _CLOSING
        conn.accepted = self._clock()  # start of the linger period
        self._service(conn)

    def _heartbeats(self, now: float) -> None:
        for conn in list(self._followers):
            sub = conn.follow
            if sub is not None and now - sub.pushed >= FOLLOW_HEARTBEAT_SECONDS:
                self._queue(conn, encode_event(sub.id_json, "heartbeat", sub.position))
                sub.pushed = now
                self._service(conn)

    def _evict(self) -> None:
        """Over output_budget: close the connections holding the most unsent bytes until under it."""
        while self._out_total > self.limits.output_budget and self._conns:
            conn = max(self._conns.values(), key=lambda c: c.out_bytes)
            log.warning(
                "%s: closed: %d bytes of answers unread while all clients hold %d "
                "(output budget %d); the client is not reading",
                conn.peer,
                conn.out_bytes,
                self._out_total,
                self.limits.output_budget,
            )
            self.stats.evicted += 1
            # Reset, not FIN: a FIN waits behind the unsent answers in the kernel's send
            # buffer, which a client that does not read never drains, so the closed
            # socket kept up to tcp_wmem (~1.9 MB each; 999 hogs: 1.9 GB of kernel
            # memory, bench/query_memory.py).  SO_LINGER 0 frees it at close.
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
            self._drop(conn)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        for _ in range(64):  # bounded: a connection flood cannot starve the others
            try:
                sock, addr = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE and friends: survive, say what to change, retry later
                log.error(
                    "accept failed: %s (raise LimitNOFILE or lower --max-connections); not accepting for %gs",
                    exc.strerror,
                    ACCEPT_PAUSE_SECONDS,
                )
                # The listener stays readable while the backlog waits: without a
                # pause the loop would spin (and log) as fast as it can.
                self._sel.unregister(self._listener)
                self._accept_paused_until = self._clock() + ACCEPT_PAUSE_SECONDS
                return
            if len(self._conns) >= self.limits.max_connections:
                self._refused += 1
                if self._refused in (1, 10, 100) or self._refused % 1000 == 0:
                    log.warning(
                        "refused %d connections: max-connections %d reached", self._refused, self.limits.max_connections
                    )
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError):
                sock.close()
                continue
            conn = _Conn(tls, f"{addr[0]}:{addr[1]}", self._clock())
            self.service.stats.connection_accepted()
            self._conns[tls.fileno()] = conn
            conn.events = selectors.EVENT_READ
            self._sel.register(tls, conn.events, conn)
            self._service(conn)

    def _sweep(self, now: float) -> None:
        self._heartbeats(now)
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self._sel.register(self._listener, selectors.EVENT_READ, "listener")
        for conn in list(self._conns.values()):
            if conn.state == _HANDSHAKE and now - conn.accepted > self.limits.handshake_timeout:
                log.info("%s: TLS handshake not finished in %gs, closed", conn.peer, self.limits.handshake_timeout)
                self.service.stats.handshake_failed("timeout")
                self._drop(conn)
            elif conn.state == _CLOSING and now - conn.accepted > LINGER_SECONDS:
                self._drop(conn)
            elif conn.partial_since is not None and now - conn.partial_since > self.limits.line_timeout:
                log.info("%s: request line unfinished after %gs, closed", conn.peer, self.limits.line_timeout)
                self._drop(conn)
            elif now - conn.touched > self.limits.idle_timeout:
                log.info("%s: idle for %gs, closed", conn.peer, self.limits.idle_timeout)
                self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        conn.closed = True  # its waiting request, if any, is skipped (_dispatch, _work)
        if conn.busy:
            for running, ops in list(self._running.values()):
                if running is conn and ops is not None:
                    ops.conn.interrupt()  # a no-op if the statement just finished
                    self.stats.interrupted += 1
        if conn.follow is not None:
            self._unfollow(conn)
        # Free its buffers now: a waiting request in _runnable keeps the object
        # alive until its turn, and 1,000 evicted clients each kept ~1 MB of
        # unsent answers that way (bench/query_memory.py: 1,054 MB of RSS).
        self._unqueue(conn, conn.out_bytes)
        conn.out.clear()
        conn.lines = LineBuffer(MAX_LINE_BYTES)
        fd = conn.sock.fileno()
        self._conns.pop(fd, None)
        self._ready.discard(fd)
        if conn.events:
            self._sel.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()

    def _service(self, conn: _Conn) -> None:
        """Advance one connection as far as it goes without blocking."""
        try:
            if conn.state != _HANDSHAKE or self._handshake(conn):
                self._pump(conn)
        except ssl.SSLError as exc:  # plaintext, old TLS, refused certificate, bad record...
            log.debug("%s: TLS failed: %s", conn.peer, exc)
            if conn.state == _HANDSHAKE:
                self.service.stats.handshake_failed("error")
                self._refuse(conn)
            else:
                self._drop(conn)
            return
        except OSError as exc:  # reset, broken pipe
            log.debug("%s: closed: %s", conn.peer, exc)
            if isinstance(exc, ConnectionResetError):
                self.stats.resets += 1
            self._drop(conn)
            return
        if conn.eof and not conn.out_bytes and (conn.state == _CLOSING or not len(conn.lines) and not conn.busy):
            self._drop(conn)
            return
        events = conn.want | (selectors.EVENT_WRITE if conn.out_bytes else 0)
        if not events and not conn.busy:
            events = selectors.EVENT_READ
        self._set_events(conn, events)

    def _set_events(self, conn: _Conn, events: int) -> None:
        """Watch for `events`; 0 unregisters (a busy connection waiting for nothing but its answer)."""
        if events == conn.events:
            return
        if not events:
            self._sel.unregister(conn.sock)
        elif not conn.events:
            self._sel.register(conn.sock, events, conn)
        else:
            self._sel.modify(conn.sock, events, conn)
        conn.events = events

    def _handshake(self, conn: _Conn) -> bool:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            conn.want = selectors.EVENT_READ
            return False
        except ssl.SSLWantWriteError:
            conn.want = selectors.EVENT_WRITE
            return False
        conn.state = _OPEN
        conn.touched = self._clock()
        return True

    def _pump(self, conn: _Conn) -> None:
        conn.want = 0
        reads = 0
        turn_ends = self._clock() + TURN_SECONDS
        while True:
            stopped = self._answer_lines(conn, turn_ends)
            if conn.out_bytes:
                self._flush(conn)
            if conn.state == _CLOSING:
                self._linger(conn)
                return
            if conn.out_bytes >= self.limits.max_output:
                return  # backpressure: a client that does not read is not read either
            if stopped.turn_over or reads >= READS_PER_TURN:
                # Others get a turn first.  Come back without waiting for an
                # event: the lines are buffered here, or decrypted inside TLS,
                # where the selector cannot see them.
                self._ready.add(conn.sock.fileno())
                return
            if stopped.full:
                continue  # the output drained: answer what is already buffered before reading more
            if conn.eof or conn.busy and len(conn.lines) >= READ_AHEAD_BYTES:
                return  # a busy connection reads ahead only this far
            try:
                data = conn.sock.recv(READ_CHUNK)
            except ssl.SSLWantReadError:
                conn.want |= selectors.EVENT_READ
                return
            except ssl.SSLWantWriteError:
                conn.want |= selectors.EVENT_WRITE
                return
            except ssl.SSLEOFError:  # TCP FIN without close_notify: OpenSSL 3 reports it, we treat it as EOF
                data = b""
            reads += 1
            conn.touched = self._clock()
            if data:
                conn.lines.feed(data)
                continue
            if _peer_reset(conn.sock):  # gone, not half-closed: its waiting work is dropped
                raise ConnectionResetError("reset by peer")
            conn.eof = True
            conn.lines.finish()  # an unterminated last line before EOF is still a request

    def _answer_lines(self, conn: _Conn, turn_ends: float) -> _Answered:
        """Answer buffered lines until none is complete, the output is full or the turn is over.

        A line that needs the database goes to a worker and stops the
        connection (busy) until its answer is queued: responses keep the
        order of requests.
        """
        while conn.state == _OPEN and not conn.busy:
            if conn.out_bytes >= self.limits.max_output:
                return _Answered(full=True, turn_over=False)
            if self._clock() >= turn_ends:
                return _Answered(full=False, turn_over=True)
            try:
                line = conn.lines.next_line()
            except LineTooLong:
                self._too_large(conn)
                break
            if line is None:
                if not len(conn.lines):
                    conn.partial_since = None
                elif conn.partial_since is None:
                    conn.partial_since = self._clock()
                break
            conn.partial_since = None
            parsed = self.service.parse(line)
            if isinstance(parsed, bytes):
                self._queue(conn, parsed)
            elif parsed.op in STREAM_OPS:
                self._queue(conn, self._follow_request(conn, parsed))
            elif self.service.needs_database(parsed):
                self._submit(conn, parsed)
            else:
                self._queue(conn, self.service.answer_inline(parsed))
        return _Answered(full=False, turn_over=False)

    def _too_large(self, conn: _Conn) -> None:
        self._queue(conn, encode_error(None, "too_large", f"request line longer than {MAX_LINE_BYTES} bytes; closing"))
        conn.lines = LineBuffer(MAX_LINE_BYTES)  # free what was buffered
        conn.state = _CLOSING
        conn.accepted = self._clock()  # start of the linger period

    def _queue(self, conn: _Conn, data: bytes) -> None:
        conn.out.append(data)
        conn.out_bytes += len(data)
        self._out_total += len(data)

    def _unqueue(self, conn: _Conn, size: int) -> None:
        """`size` unsent bytes of conn's output are gone (sent or discarded)."""
        conn.out_bytes -= size
        self._out_total -= size

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            head = conn.out[0]
            # On a retry after SSLWantWriteError the same bytes are offered
            # again, as OpenSSL requires (out[0] and the offset are unchanged).
            chunk = memoryview(head)[conn.out_offset : conn.out_offset + SEND_CHUNK]
            try:
                sent = conn.sock.send(chunk)
            except ssl.SSLWantWriteError:
                conn.want |= selectors.EVENT_WRITE
                return
            except ssl.SSLWantReadError:
                conn.want |= selectors.EVENT_READ
                return
            conn.touched = self._clock()
            conn.out_offset += sent
            self._unqueue(conn, sent)
            if conn.out_offset >= len(head):
                conn.out.popleft()
                conn.out_offset = 0

    def _refuse(self, conn: _Conn) -> None:
        """A failed handshake: OpenSSL has sent its alert; linger so a RST cannot destroy it.

        Under TLS 1.3 a client whose certificate we refuse has already sent
        its first request, and closing on unread bytes would reset the
        connection before the client reads the alert that says why.
        """
        conn.state = _CLOSING
        conn.out.clear()
        self._unqueue(conn, conn.out_bytes)
        conn.accepted = self._clock()
        try:
            self._linger(conn)
        except OSError:
            self._drop(conn)
            return
        if conn.eof:
            self._drop(conn)
            return
        self._set_events(conn, selectors.EVENT_READ)

    def _linger(self, conn: _Conn) -> None:
        """After too_large: send the error, then FIN, then drain until the peer closes.

        Closing with unread input would send a RST, and a RST can destroy the
        error response before the client reads it.  Draining is bounded by
        LINGER_SECONDS (checked in _sweep) and by LINGER_MAX_BYTES: past that
        the client is not reading its answer but flooding, and is closed.
        """
        if conn.out_bytes:
            return
        if not conn.eof:
            if isinstance(conn.sock, ssl.SSLSocket) and conn.sock._sslobj is not None:  # noqa: SLF001
                conn.sock.shutdown(socket.SHUT_WR)  # drops TLS: what follows is raw bytes to discard
            try:
                while data := conn.sock.recv(READ_CHUNK):
                    conn.drained += len(data)
                    if conn.drained > LINGER_MAX_BYTES:
                        break
                conn.eof = True  # the peer closed, or is flooding: either way, read no more (callers drop it)
            except BlockingIOError:
                conn.want = selectors.EVENT_READ


def _listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket on host:port (port 0: any free port)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SetupError(f"cannot resolve listen address {host!r}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # The server has one listening socket: "[::]" means every address,
            # IPv4 (mapped) included; a named IPv6 address stays IPv6 only.
            wildcard = sockaddr[0] == "::"
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if wildcard else 1)
        sock.bind(sockaddr)
        sock.listen(512)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = {
            errno.EADDRINUSE: "another process uses this port: pick another --listen port or stop it",
            errno.EACCES: "ports below 1024 need privileges: use the default 4740 or CAP_NET_BIND_SERVICE",
            errno.EADDRNOTAVAIL: "this host has no such address: check --listen",
        }.get(exc.errno or 0, "check --listen")
        raise SetupError(f"cannot listen on {host}:{port}: {exc.strerror} ({hint})") from None
    return sock
