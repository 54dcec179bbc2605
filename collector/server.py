"""The collector: one selectors loop that reads, decodes, tracks, queues and flushes.

Shaped like socketserver: `Collector(settings)` binds every socket and opens
the database (so `addresses` is known at once, even for port 0),
`serve_forever()` runs the loop until `shutdown()` (thread-safe, through a
wake-up socketpair that also serves as the signal wake-up fd), and the loop
ends with a final flush, so nothing accepted is lost on a clean stop.

Each wake drains every ready socket up to a budget, so one flooded socket
cannot starve the others, then flushes when the batch is full or the flush
interval is up: in a writer thread, one flush (or head's close) at a time,
while the loop reads on (`_start_flush`; the store is the writer's until it
is done, and the loop accounts it then).  The hot path reads top to bottom in `_drain` (receive) and
`_process` (decode, track, queue): no logging, no objects beyond the decoded
datagram and one row tuple per reading.  Signed datagrams (first byte 0x93)
take a side door, `_verify` (tag, body, replay window), then rejoin it; the
key file is reloaded on SIGHUP between bursts, never inside one.
"""

from __future__ import annotations

import gc
import logging
import selectors
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from . import auth, dbfile, health, healthstore, mmsg, net, retention, tuning
from .errors import ConfigError, DecodeError, SetupError
from .histogram import FlushStats
from .ingest import IngestCore, Refused, Rejected
from .schema import REJECT_REASONS
from .store import CHUNK_DATAGRAMS, FlushJob, Store

log = logging.getLogger("collector")

ANC_BUFSIZE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 64
_U32 = struct.Struct("=I")


@dataclass
class Settings:
    """Everything the collector needs; the CLI fills it from flags, env and file."""

    db: str = tuning.DEFAULT_DB_PATH
    listen: tuple[tuple[str, int], ...] = ((tuning.DEFAULT_LISTEN_HOST, tuning.DEFAULT_UDP_PORT),)
    multicast: tuple[tuple[str, int | None], ...] = ()  # (group, port or None = default)
    multicast_interface: str | None = None
    flush_interval: float = tuning.DEFAULT_FLUSH_INTERVAL_S
    batch_size: int = tuning.DEFAULT_BATCH_ROWS
    rcvbuf: int = tuning.DEFAULT_RCVBUF_BYTES
    status_interval: float = tuning.DEFAULT_STATUS_INTERVAL_S
    keys: str | None = None  # key file of signed datagrams (auth.load_keys); reloaded on SIGHUP
    require_auth: bool = False  # reject plain datagrams as not_signed
    metrics: tuple[str, int] | None = None  # Prometheus exporter address (collector/metrics.py); None: off
    metrics_sensors: int = 0  # per-sensor metrics for at most this many sensors (0: none)
    stale_factor: float = health.DEFAULT_STALE_FACTOR  # collector/health.py
    stale_floor: float = health.DEFAULT_STALE_FLOOR_S
    clock_threshold: float = health.DEFAULT_CLOCK_THRESHOLD_S
    # Knobs for tests and the benchmark; operators have no flag for them.
    max_backlog_rows: int = tuning.MAX_BACKLOG_ROWS
    max_sensors: int = tuning.MAX_SENSORS
    max_series_per_sensor: int = tuning.MAX_SERIES_PER_SENSOR
    chunk_datagrams: int = CHUNK_DATAGRAMS  # a head closes into a chunk at this many datagrams
    # ... and at this many times that when its sensor sends faster than store.FAST_HEAD_RATE
    # (1: never).  Not the default: session 10's 4 (store.FAST_HEAD_FACTOR) cut the writer
    # threads' CPU but lost more datagrams at 135,000/s (docs/OPERATIONS.md, session 10).
    fast_head_factor: int = 1
    recv_buffer_bytes: int = tuning.RECV_BUFFER_BYTES
    # Storage v3 (collector/retention.py): raw and rollup retention (seconds,
    # 0 = forever) and the disk budget (bytes of database + WAL, None = none).
    retain: float = retention.DEFAULT_RETAIN_S
    retain_1m: float = retention.DEFAULT_RETAIN_1M_S
    retain_1h: float = retention.DEFAULT_RETAIN_1H_S
    max_disk: int | None = None
    drain_budget: int = tuning.DRAIN_BUDGET_DATAGRAMS
    # A flush is followed by a maintenance step (retention, budget, scrub) at most this often
    # (seconds; --flush-interval if shorter).
    maintain_interval: float = tuning.MAINTAIN_MIN_INTERVAL_S
    # The CLI sets it (the process is the collector's alone): gc.freeze() once
    # started, so gen-2 passes skip what start-up built.  Not for embedders.
    freeze_gc: bool = False
    # The CLI sets it too: the collector's threshold of gc's youngest generation while serving
    # (gc.set_threshold; None: leave it).  Not for embedders.
    gc_threshold: int | None = None
    # The CLI sets it too: the interpreter's GIL switch interval while serving
    # (sys.setswitchinterval; None: leave it).  Not for embedders.
    switch_interval: float | None = None
    batch_receive: bool = True  # recvmmsg(2) where libc has it (collector/mmsg.py); False: recv per datagram
    # Flushes and closes in a writer thread while the loop reads on (Collector._start_flush);
    # False: in the loop's own thread, the loop away from its sockets meanwhile (session 5's way).
    writer_thread: bool = True

    def __post_init__(self) -> None:
        # Here rather than in Collector, so `--check` refuses what a start would.
        if self.require_auth and not self.keys:
            raise ConfigError("--require-auth needs --keys FILE: without keys every datagram would be rejected")
        try:
            self.health_policy = health.HealthPolicy(self.stale_factor, self.stale_floor, self.clock_threshold)
        except ValueError as exc:
            raise ConfigError(str(exc).replace("_", "-")) from None


class _Source:
    """Per-socket state: the endpoint, its kernel drop count, whether we need sources."""

    __slots__ = ("endpoint", "sock", "drops", "want_source_until", "batch")

    def __init__(self, endpoint: net.Endpoint, batch: mmsg.BatchReceiver | None = None) -> None:
        self.endpoint = endpoint
        self.sock = endpoint.sock
        self.batch = batch  # recvmmsg, or None: recvmsg then recv per datagram
        self.drops = 0  # last cumulative SO_RXQ_OVFL value seen
        # Plain recv() is ~0.4 us cheaper than recvfrom(); we switch to
        # recvfrom only while a rejected datagram's log line waits for a
        # source, for one log interval at most.
        self.want_source_until = 0.0


class _Writing:
    """A flush (or, with no job, a head's close) in the writer thread (Collector._start_writing)."""

    __slots__ = ("job", "rows", "started", "took", "done", "crashed", "thread")

    def __init__(self, job: FlushJob | None, rows: int, started: float) -> None:
        self.job = job
        self.rows = rows  # readings it writes
        self.started = started  # monotonic
        self.took = 0.0
        self.done = threading.Event()
        self.crashed: BaseException | None = None
        self.thread: threading.Thread | None = None


def _noop(message: str) -> None:
    pass


class Collector:
    """The UDP collector.  Construct (binds, opens), serve_forever(), shutdown(), server_close()."""

    def __init__(
        self, settings: Settings, *, notify: Callable[[str], object] = _noop, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.notify = notify
        self.clock = clock
        self.endpoints: list[net.Endpoint] = []
        self.store: Store | None = None
        self.core: IngestCore | None = None
        # Signed datagrams: the key set (the core swaps it whole on reload).
        # Loaded before anything is opened, so a refusal leaks nothing.
        keyring = auth.load_keys(settings.keys) if settings.keys else {}  # ConfigError before anything is bound
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = False
        self._calls: deque[Callable[[], object]] = deque()
        self._serving = threading.Event()
        self._done = threading.Event()
        self.unflushed_at_exit = 0
        self.final_flush_failed = False  # the last line then says what is not written, and the exit code is 1
        self._activity = False  # a datagram arrived since the last flush: counters changed
        self._now = 0.0  # the clock at the last drain
        self._sources: list[_Source] = []
        self._reject_next_log = dict.fromkeys(REJECT_REASONS, 0.0)
        self._reload_requested = False
        self._unlogged_rejects: dict[str, tuple[str, str]] = {}  # reason -> (message, socket) awaiting a line
        self.flush_stats = FlushStats()
        self.health = health.HealthBook(settings.health_policy)
        self.metrics_server = None
        # The file at --db (collector/dbfile.py): None while it is ours.
        self._file_problem: str | None = None
        self._file_error = ""
        self._file_retry_at = 0.0
        self._file_retry_delay = 1.0
        self._maintain_at = 0.0  # monotonic: the next flush from then on is followed by a maintenance step
        self.db_lost: str | None = None  # set when the run ends without its database at --db
        self._writing: _Writing | None = None  # the flush in the writer thread, if one is
        try:
            self._bind()
            self.store = Store(
                settings.db,
                max_backlog_rows=settings.max_backlog_rows,
                retain=float(settings.retain),
                retain_1m=float(settings.retain_1m),
                retain_1h=float(settings.retain_1h),
                max_disk=None if settings.max_disk is None else int(settings.max_disk),
                close_between_flushes=True,
                chunk_datagrams=settings.chunk_datagrams,
                fast_head_factor=settings.fast_head_factor,
            )
            loaded = self.store.load()
            self.core = IngestCore(
                counters=loaded.counters,
                sensors=loaded.sensors,
                next_series_id=loaded.next_series_id,
                keyring=keyring,
                require_auth=settings.require_auth,
                max_sensors=settings.max_sensors,
                max_series_per_sensor=settings.max_series_per_sensor,
            )
            healthstore.attach(self.health, self.store)
            if settings.metrics is not None:
                from .metrics import CollectorMetrics, serve_metrics

                self.metrics_server = serve_metrics(
                    settings.metrics, CollectorMetrics(self, clock, settings.metrics_sensors)
                )
        except BaseException:
            self.server_close()
            raise
        for reason in REJECT_REASONS:
            self.core.counters.setdefault(f"rejected:{reason}", 0)
        self._dropped_before = self.core.counters["storage_dropped"]  # by earlier runs

    # --- set-up ------------------------------------------------------------------------

    def _bind(self) -> None:
        s = self.settings
        if not s.listen and not s.multicast:
            raise SetupError("nothing to listen on: give --listen or --multicast")
        for host, port in s.listen:
            self.endpoints.append(net.open_unicast(host, port, s.rcvbuf))
        if s.multicast:
            default_port = self.endpoints[0].address[1] if self.endpoints else tuning.DEFAULT_UDP_PORT
            interface = net.Interface.resolve(s.multicast_interface)
            for group, port in s.multicast:
                self.endpoints.append(net.open_multicast(group, port or default_port, interface, s.rcvbuf))

    @property
    def holding_reads(self) -> bool:
        """The loop reads nothing while the writer thread is out: its queue is at max_backlog_rows."""
        return self._writing is not None and self.core.pending_readings >= self.settings.max_backlog_rows

    def _hold_log(self, mono: float) -> None:
        """Say (at most once per interval) that the writer holds the loop's reads."""
        now = self.clock()
        if self._quiet("writer_hold", now):
            return
        self._reject_next_log["writer_hold"] = now + tuning.REJECT_LOG_INTERVAL_S
        assert self._writing is not None
        log.warning(
            "the database write started %.1f s ago is not done and %d readings wait for it "
            "(max_backlog_rows): reading nothing until it is; datagrams the sockets cannot hold "
            "meanwhile are dropped by the kernel and counted in kernel_drops",
            mono - self._writing.started,
            self.core.pending_readings,
        )

    @property
    def writing(self) -> bool:
        """A flush or a head's close is in the writer thread now (read it in the loop's thread)."""
        return self._writing is not None

    @property
    def addresses(self) -> list[tuple]:
        """getsockname() of every socket, in the order listen then multicast."""
        return [ep.address for ep in self.endpoints]

    @property
    def counters(self) -> dict[str, float]:
        return self.core.counters

    @property
    def keyring(self) -> dict[str, bytes]:
        return self.core.keyring

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the loop, SIGHUP reloads the key file (main thread
        only); the wake-up fd ends select(), and the loop does the work."""
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def stop(signum, frame):
            self._stop = True

        def reload(signum, frame):
            # Only a flag: reading files and logging do not belong in a handler.
            self._reload_requested = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    # --- keys ----------------------------------------------------------------------------

    def reload_keys(self) -> bool:
        """Read the key file again and swap the key set in whole (the loop's
        thread only: SIGHUP, or call_soon).  A file that fails to load leaves
        the old keys in force; either way one log line, never a key."""
        path = self.settings.keys
        if path is None:
            log.warning("keys not reloaded: no key file is configured (--keys)")
            return False
        try:
            keys = auth.load_keys(path)
        except ConfigError as exc:
            log.error("keys not reloaded, the previous %d keys stay in force: %s", len(self.keyring), exc)
            return False
        self.core.set_keys(keys)
        log.info("keys reloaded from %s: %d keys for %d sensors", path, len(keys), len(self.core.keyed))
        return True

    # --- control -----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop serve_forever (from any thread) and wait until it has flushed."""
        self._stop = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # buffer full: a wake-up is pending anyway
        if self._serving.is_set() and threading.current_thread() is not getattr(self, "_thread", None):
            self._done.wait()

    def call_soon(self, func: Callable[[], object]) -> None:
        """Run `func` in the loop's thread at the end of its next turn (thread-safe).

        The loop owns the database connection; anything that must touch it
        from outside (a test, an admin hook) goes through here.  At the end of
        a turn the bursts read in it are judged and queued, and the flush step
        has run (a refused backlog trimmed); a flush or close may still be in
        the writer thread (`writing`).
        """
        self._calls.append(func)
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def flush(self) -> bool:
        """Write the pending batch now (only between loop iterations or when not serving)."""
        return self._flush(time.monotonic())

    def server_close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        for ep in self.endpoints:
            ep.sock.close()
        self._wake_r.close()
        self._wake_w.close()
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc) -> None:
        self.server_close()

    # --- the loop ----------------------------------------------------------------------

    def log_start(self) -> None:
        import sqlite3

        for ep in self.endpoints:
            drops = "kernel drop counter on" if ep.drop_counter else "no kernel drop counter"
            log.info(
                "listening %s (rcvbuf asked %d, granted %d; %s)",
                ep.label,
                ep.rcvbuf_requested,
                ep.rcvbuf_granted,
                drops,
            )
        s = self.settings
        if s.keys:
            log.info(
                "signed datagrams: %d key%s for %d sensor%s from %s (SIGHUP reloads it); unsigned datagrams are %s",
                len(self.keyring),
                "" if len(self.keyring) == 1 else "s",
                len(self.core.keyed),
                "" if len(self.core.keyed) == 1 else "s",
                s.keys,
                "rejected (--require-auth)" if s.require_auth else "accepted from sensors without a key",
            )
        # One line naming everything, for whoever reads only the first lines of a log.
        log.info(
            "started: %s; database %s (sqlite_version %s, %d sensors known); flush every %.3g s or %d rows",
            ", ".join(ep.label for ep in self.endpoints),
            s.db,
            sqlite3.sqlite_version,
            len(self.core.sensors),
            s.flush_interval,
            s.batch_size,
        )

    def serve_forever(self) -> None:
        self._thread = threading.current_thread()
        s = self.settings
        store = self.store
        core = self.core
        sel = selectors.DefaultSelector()
        switch_interval = sys.getswitchinterval()
        thresholds = gc.get_threshold()
        try:
            batch = s.batch_receive and mmsg.available()
            self._sources = [
                _Source(ep, mmsg.BatchReceiver(ep.sock, tuning.RECVMMSG_VLEN, s.recv_buffer_bytes) if batch else None)
                for ep in self.endpoints
            ]
            for source in self._sources:
                sel.register(source.sock, selectors.EVENT_READ, source)
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            if s.freeze_gc:
                # What start-up built (modules, sensors' trackers) lives as long
                # as the process: a gen-2 pass over it held the loop 30-45 ms
                # (loaded box), a third of what the socket buffer holds at
                # 150k datagrams/s; the loop's own objects are few.
                gc.collect()
                gc.freeze()
            if s.gc_threshold is not None:
                # A flush's groups, columns and log row are young containers that
                # live until its transaction ends: at Python's 700 the collector
                # traced them again and again (140 collections per 300,000
                # datagrams of 5 readings from 100 sensors, 0.14 us a datagram;
                # 2,000 sensors: 3.9 us, with gen-2 passes), and found them alive.
                gc.set_threshold(s.gc_threshold, *thresholds[1:])
            if s.switch_interval is not None:
                # The loop gives the GIL up in select() and then waits for the
                # writer thread to hand it back: at most this long, not 5 ms.
                sys.setswitchinterval(s.switch_interval)
            self._serving.set()
            self.notify("READY=1")
            # Deadlines run on the monotonic clock: a gateway without an RTC
            # may step its wall clock by years when NTP syncs.
            mono = time.monotonic()
            next_flush = mono + s.flush_interval
            next_status = mono + s.status_interval
            next_watchdog = 0.0
            self._status_base = (mono, dict(core.counters), self._lost())
            drain = self._drain
            counters = core.counters
            closed_at = counters["received"]  # `received` when a head last closed between drains
            close_every = max(1, store.chunk_datagrams // 2)
            while not self._stop:
                if self._writing is not None and self._writing.done.is_set():
                    self._end_writing()
                    if self._stop:  # the file at --db was replaced (_guard_file)
                        break
                # While the writer thread writes, the loop only reads: the store
                # (its connection, heads, retry schedule) is the writer's until it
                # is done, and the next flush waits for it (its wake-up ends the select).
                idle = self._writing is None
                timeout = min(next_flush, next_status) if idle else next_status
                if idle and store.failing_since is not None:
                    timeout = min(timeout, store.retry_at)
                elif idle and core.pending_readings >= s.batch_size:
                    timeout = 0.0  # a full batch waited for the writer: flush it now
                # Capped: epoll cannot wait longer than 2**31-1 ms, and an
                # interval may be longer (or inf): the loop just wakes again.
                wait = min(max(timeout - time.monotonic(), 0.0), tuning.MAX_SELECT_TIMEOUT_S)
                events = None
                held = False
                mono = time.monotonic()
                if self.holding_reads:
                    # The queue is at its bound and the writer is still out (a slow
                    # or stalled disk): read nothing more until it is back.  What
                    # the sockets cannot hold meanwhile the kernel drops and counts
                    # (kernel_drops), as when the loop itself wrote; the memory a
                    # sender can make this process hold stays bounded.
                    self._hold_log(mono)
                    assert self._writing is not None
                    self._writing.done.wait(min(wait, tuning.WATCHDOG_MIN_INTERVAL_S))
                    events, held = [], True
                elif idle and store.full and wait > 0 and store.failing_since is None:
                    # Heads at their count: close one now if nothing waits to be
                    # read, rather than inside the next flush (store.close_one),
                    # in the writer thread; its wake-up ends the wait.
                    events = sel.select(0)
                    if not events:
                        self._start_close(mono)
                        if self._writing is not None:
                            wait = min(max(next_status - time.monotonic(), 0.0), tuning.MAX_SELECT_TIMEOUT_S)
                if not events and not held:
                    events = sel.select(wait)
                for key, _ in events:
                    source = key.data
                    if source is None:
                        self._drain_wakeups()
                    else:
                        drain(source)
                if self._writing is None and store.full and counters["received"] - closed_at >= close_every:
                    # Continuous traffic: the sockets may never be empty, so heads
                    # at their count close here too, one per half a chunk of
                    # datagrams received (twice as fast as equal-rate sensors
                    # fill them), rather than many in one flush at twice the
                    # count (store.close_one, _close_heads); but only while the
                    # queues are short: a backlog is read first.
                    closed_at = counters["received"]
                    if store.failing_since is None and self._room_to_close():
                        self._start_close(mono)
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload_keys()
                mono = time.monotonic()
                if self._writing is None and (core.pending_readings >= s.batch_size or mono >= next_flush):
                    self._poll_drops()
                    flushing = False
                    if store.failing_since is None or mono >= store.retry_at:
                        if self._activity or core.pending_datagrams or core.dirty or store.due(self.clock()):
                            flushing = True
                            self._start_flush(mono)  # and a maintenance step after it; then _after_flush
                        else:  # idle: retention and the scrub go on
                            store.maintain(core.counters, self.clock())
                    self._log_unlogged_rejects()
                    if not flushing:
                        self._after_flush(mono)
                    next_flush = mono + s.flush_interval
                if mono >= next_status:
                    self._poll_drops()
                    self._log_status(mono)
                    next_status = mono + s.status_interval
                if mono >= next_watchdog:
                    self.notify("WATCHDOG=1")
                    next_watchdog = mono + tuning.WATCHDOG_MIN_INTERVAL_S
                if self._calls:
                    self._run_calls()
        finally:
            sys.setswitchinterval(switch_interval)
            gc.set_threshold(*thresholds)
            self.notify("STOPPING=1")
            sel.close()
            self._wait_for_writer()
            self._poll_drops()
            self._final_flush()
            self._final_file_check()
            self._done.set()

    def _room_to_close(self) -> bool:
        """Every socket's queue is short enough to spend a close's few ms (False where unknown)."""
        for source in self._sources:
            fill = net.queue_fill(source.sock)
            if fill is None or fill >= tuning.CLOSE_QUEUE_FILL_MAX:
                return False
        return True

    def _start_flush(self, mono: float) -> None:
        """Hand the pending batch to the writer thread: the transaction (and the
        maintenance step after it, at most every Settings.maintain_interval) runs there
        while this loop reads on.

        SQLite releases the GIL while it works (statements, the COMMIT's WAL
        writes, checkpoints and their fsync), and the writer's Python gives it
        up every switch interval (Settings.switch_interval: 0.5 ms from the
        CLI, Python's 5 ms otherwise), so the loop is away from its sockets
        a few ms at a time instead of a whole flush (35-45 ms of CPU and
        100-270 ms of wall time on a loaded box at 162,500 datagrams/s, against
        the ~60 ms an 8 MiB buffer holds: bench/ingest_stalls.py)."""
        self.health.sample_states(self.core.dirty)
        maintain = mono >= self._maintain_at
        if maintain:
            self._maintain_at = mono + min(self.settings.maintain_interval, self.settings.flush_interval)
        job = self.store.begin(self.core, self.clock(), maintain=maintain)
        self._activity = False  # datagrams from now on set it again
        self._start_writing(_Writing(job, self.core.pending_readings, mono))

    def _start_close(self, mono: float) -> None:
        """Close the oldest full head (store.close_one) in the writer thread."""
        self._start_writing(_Writing(None, 0, mono))

    def _start_writing(self, writing: _Writing) -> None:
        self._writing = writing
        if not self.settings.writer_thread:
            self._write(writing)
            self._end_writing()
            return
        writing.thread = threading.Thread(target=self._write, args=(writing,), name="collector-writer", daemon=True)
        writing.thread.start()

    def _write(self, writing: _Writing) -> None:
        """The writer thread: one flush or one close, then wake the loop."""
        try:
            if writing.job is None:
                self.store.close_one()
            else:
                self.store.write(writing.job)
        except BaseException as exc:  # a bug: the loop raises it, as it would have in its own thread
            writing.crashed = exc
        finally:
            writing.took = time.monotonic() - writing.started
            writing.done.set()
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass  # a wake-up is pending anyway (or the loop is gone)

    def _after_flush(self, mono: float) -> None:
        """After a flush (or a flush's turn without one): bound the backlog the database
        refused, and check the file at --db (after the flush: a copy holds this batch too)."""
        if self.store.failing_since is not None:
            self.core.trim(self.settings.max_backlog_rows)
        if mono >= self._file_retry_at:
            self._guard_file(mono)

    def _end_writing(self, after: bool = True) -> None:
        """In the loop: account the flush (or close) the writer thread finished;
        then, if `after`, what follows a flush (_after_flush)."""
        writing, self._writing = self._writing, None
        assert writing is not None
        if writing.thread is not None:
            writing.thread.join()
        if writing.crashed is not None:
            raise writing.crashed
        if writing.job is None:
            return  # a close: store.close_one said what it had to
        ok = self.store.end(self.core, writing.job, writing.started + writing.took)
        self.flush_stats.record(writing.took, writing.rows, ok)
        if not ok:
            self._activity = True
            self.health.forget_written()  # rolled back: the next flush writes every health row again
        if after:
            self._after_flush(time.monotonic())

    def _wait_for_writer(self) -> None:
        """Let the writer thread finish its flush and account it (before the store is used here)."""
        if self._writing is not None:
            self._writing.done.wait()
            self._end_writing(after=False)

    def _flush(self, mono: float) -> bool:
        """One flush in the calling thread: sample sensor health first, and time it for the metrics."""
        self._wait_for_writer()
        store = self.store
        self.health.sample_states(self.core.dirty)
        rows = self.core.pending_readings
        started = time.monotonic()
        ok = store.flush(self.core, self.clock(), mono)
        self.flush_stats.record(time.monotonic() - started, rows, ok)
        if not ok:
            self.health.forget_written()  # rolled back: the next flush writes every health row again
        return ok

    def _final_flush(self) -> None:
        store = self.store
        self.health.sample_states(self.core.dirty)
        # Bounded: a database that stays unwritable must not keep us from exiting.
        deadline = time.monotonic() + 5.0
        while True:
            if store.flush(self.core, self.clock(), time.monotonic()):
                self.unflushed_at_exit = 0
                return
            self.health.forget_written()
            if time.monotonic() > deadline:
                break
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        core = self.core
        self.unflushed_at_exit = core.pending_readings
        self.final_flush_failed = True
        sensors = len(core.dirty)
        dropped = int(core.counters["storage_dropped"] - self._dropped_before)
        log.error(
            "exiting with %d readings of %d datagrams not written to %s (database refused the final flush)%s; "
            "the sequence accounts of %d sensor%s since the last good flush are not written either",
            self.unflushed_at_exit,
            len(core.pending),
            self.settings.db,
            f", and {dropped} readings of this run were dropped before (storage_dropped)" if dropped else "",
            sensors,
            "" if sensors == 1 else "s",
        )

    # --- the file at --db (collector/dbfile.py) -------------------------------------------

    def _guard_file(self, mono: float) -> None:
        """Is the file at --db still ours?  If it was deleted or moved, put the
        database back there; if replaced, save ours aside and stop (exit 1)."""
        store, path = self.store, self.settings.db
        found = dbfile.check(path, store.lock_fd)
        if found.verdict == dbfile.OK:
            if self._file_problem is not None:
                log.warning("database %s is reachable again", path)
            self._file_problem, self._file_retry_delay = None, 1.0
            return
        if found.verdict == dbfile.REPLACED:
            self._save_aside(found)
            self._stop = True
            return
        if found.verdict == dbfile.GONE and self._restore(found):
            return
        if self._file_problem != found.detail:
            log.error(
                "database %s %s; this collector's database lives on only in the open file, and "
                "everything in it is lost if the collector stops before the file is back: retrying "
                "every %g s at most (make the directory writable again)",
                path,
                found.detail
                if found.verdict == dbfile.UNREACHABLE
                else f"was {found.detail}, and cannot be put back ({self._file_error})",
                tuning.RETRY_MAX_S,
            )
        self._file_problem = found.detail
        self._file_retry_at = mono + self._file_retry_delay
        self._file_retry_delay = min(self._file_retry_delay * 2, tuning.RETRY_MAX_S)

    def _restore(self, found: dbfile.FileCheck) -> bool:
        store, path = self.store, self.settings.db
        try:
            store.restore_at_path()
        except dbfile.Stranded as exc:
            self.db_lost = (
                f"database {path} was {found.detail}; a complete copy is in {exc.copy}, but it "
                f"could not be put in place ({exc.cause}): move it to {path} before restarting"
            )
            log.error("%s; stopping", self.db_lost)
            self._stop = True
            return True
        except (OSError, sqlite3.Error) as exc:
            self._file_error = getattr(exc, "strerror", None) or str(exc)
            return False
        log.error(
            "database %s was %s: put back there from the open file (%d readings, everything "
            "flushed so far) and writing on there",
            path,
            found.detail,
            int(self.core.counters["stored_readings"]),
        )
        self._file_problem, self._file_retry_delay, self._file_retry_at = None, 1.0, 0.0
        return True

    def _save_aside(self, found: dbfile.FileCheck) -> None:
        store, path = self.store, self.settings.db
        try:
            saved = dbfile.save_aside(store.conn, path, self.clock())
        except (OSError, sqlite3.Error) as exc:
            self.db_lost = (
                f"database {path} was {found.detail}, and this collector's database could not be "
                f"saved beside it ({getattr(exc, 'strerror', None) or exc}): "
                f"{int(self.core.counters['stored_readings'])} readings are lost"
            )
        else:
            self.db_lost = (
                f"database {path} was {found.detail}; this collector's database "
                f"({int(self.core.counters['stored_readings'])} readings) is saved as {saved}: "
                f"restart to use the new file, or put the saved one back"
            )
        log.error("%s; stopping", self.db_lost)

    def _final_file_check(self) -> None:
        """At exit: the last chance to put a deleted database back; otherwise say what is lost."""
        if self.db_lost is not None:
            return
        found = dbfile.check(self.settings.db, self.store.lock_fd)
        if found.verdict == dbfile.OK:
            return
        if found.verdict == dbfile.REPLACED:
            self._save_aside(found)
            return
        if found.verdict == dbfile.GONE and self._restore(found):
            return
        why = (
            found.detail
            if found.verdict == dbfile.UNREACHABLE
            else f"was {found.detail}, and cannot be put back ({self._file_error})"
        )
        self.db_lost = (
            f"database {self.settings.db} {why}: the "
            f"{int(self.core.counters['stored_readings'])} readings in the open file are lost "
            f"with it"
        )
        log.error("exiting: %s", self.db_lost)

    def stop_message(self) -> tuple[int, str]:
        """(log level, line) to end a run whose final flush succeeded: it may
        claim that everything accepted is stored only if this run dropped nothing."""
        dropped = int(self.core.counters["storage_dropped"] - self._dropped_before)
        if dropped:
            return logging.WARNING, (
                f"stopped; {dropped} readings of this run were dropped while the database "
                f"refused writes (storage_dropped); every other accepted datagram is stored"
            )
        return logging.INFO, "stopped cleanly; every accepted datagram is stored"

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except OSError:  # BlockingIOError: drained
            pass

    def _run_calls(self) -> None:
        """call_soon's functions, at the end of a turn of the loop."""
        while self._calls:
            func = self._calls.popleft()
            try:
                func()
            except Exception:
                log.exception("a call_soon function failed")

    def _drain(self, source: _Source) -> None:
        """Read up to the budget from one socket, then decode, track and queue each datagram."""
        if source.batch is not None:
            self._drain_batches(source, source.batch)
            return
        sock = source.sock
        bufsize = self.settings.recv_buffer_bytes
        counters = self.core.counters
        truncated = 0
        # The first read of a burst uses recvmsg: its ancillary data carries the
        # kernel's cumulative drop count for this socket (SO_RXQ_OVFL), and its
        # flags say whether the datagram was cut (MSG_TRUNC).  The rest use
        # plain recv, which is cheaper, and one drop reading per burst is
        # enough (it is cumulative).
        try:
            data, ancdata, flags, address = sock.recvmsg(bufsize, ANC_BUFSIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("%s: receive failed: %s", source.endpoint.label, exc.strerror or exc)
            return
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == tuning.SO_RXQ_OVFL and len(cdata) >= 4:
                self._account_drops(source, _U32.unpack_from(cdata)[0])
        datas = [data]
        want = source.want_source_until
        # (A wish more than an interval ahead outlived a backward clock step.)
        addresses = [address] if self._now < want <= self._now + tuning.REJECT_LOG_INTERVAL_S else None
        if flags & socket.MSG_TRUNC:
            datas.pop()
            truncated += 1
            if addresses:
                addresses.pop()
        try:
            if addresses is None:
                # The fast path: plain recv, no source address (1.03 us
                # against 1.39 us for recvfrom per datagram).
                recv = sock.recv
                append_data = datas.append
                for _ in range(self.settings.drain_budget - 1):
                    append_data(recv(bufsize))
            else:
                for _ in range(self.settings.drain_budget - 1):
                    data, address = sock.recvfrom(bufsize)
                    datas.append(data)
                    addresses.append(address)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            log.warning("%s: receive failed: %s", source.endpoint.label, exc.strerror or exc)

        if truncated:
            counters["truncated"] += truncated
        counters["received"] += len(datas) + (1 if flags & socket.MSG_TRUNC else 0)
        # Receive times are kept at 1 us (the clock's float carries ~0.2 us of
        # noise at today's epoch): chunks of them are ~40 % smaller and cheaper
        # to encode (collector/chunkenc.py, module doc).
        self._process(datas, addresses, source, round(self.clock(), 6))

    def _drain_batches(self, source: _Source, receiver: mmsg.BatchReceiver) -> None:
        """recvmmsg: up to the budget in calls of up to RECVMMSG_VLEN datagrams,
        each call's datagrams processed before the next overwrites the buffer.
        Every datagram's source is at hand, for the log lines of rejects."""
        counters = self.core.counters
        budget = self.settings.drain_budget
        while budget > 0:
            try:
                datas, cut, drops = receiver.receive(budget)
            except OSError as exc:
                log.warning("%s: receive failed: %s", source.endpoint.label, exc.strerror or exc)
                return
            n = len(datas) + cut
            if not n:
                return
            if drops is not None:
                self._account_drops(source, drops)
            counters["received"] += n
            if cut:
                counters["truncated"] += cut
            self._process(datas, mmsg.Addresses(receiver, len(datas)), source, round(self.clock(), 6), False)
            if n < min(budget, receiver.vlen):
                return  # the socket is empty
            budget -= n

    def _process(self, datas: list[bytes], addresses, source: _Source, now: float, filled: bool = True) -> None:
        """Hand one burst to the ingest core (the hot path) and log what it reports.

        `addresses`: each datagram's source by index, or None when not recorded;
        `filled`: whether a datagram that filled the receive buffer may be cut
        (recv does not say; recvmmsg flags it, and the caller counted it)."""
        bufsize = self.settings.recv_buffer_bytes
        if filled and max(map(len, datas), default=0) >= bufsize:
            # Only a datagram bigger than any UDP payload fills the buffer.
            kept = [i for i, data in enumerate(datas) if len(data) < bufsize]
            self.core.counters["truncated"] += len(datas) - len(kept)
            datas = [datas[i] for i in kept]
            if addresses:
                addresses = [addresses[i] for i in kept]
        for i, outcome in self.core.receive_many(datas, now):
            self._report(outcome, source, addresses[i] if addresses else None, now)
        self._activity = True
        self._now = now

    def _report(self, outcome, source: _Source, address, now: float) -> None:
        if outcome.__class__ is Rejected:
            self._rejected(source, outcome.error, address, now)
        elif outcome.__class__ is Refused:
            self._refused(outcome.what, outcome.counter, now)
        elif not self._quiet("internal", now):
            self._reject_next_log["internal"] = now + tuning.REJECT_LOG_INTERVAL_S
            log.error("internal error on a datagram from %s", _source_text(address), exc_info=outcome.error)

    def _quiet(self, key: str, now: float) -> bool:
        """True while log lines of `key` are held back (at most one per interval).

        The deadline is on the wall clock, like `now`; one more than an
        interval ahead means the clock stepped back (NTP setting right a
        gateway that booted without an RTC), and must not silence the log
        for the size of the step.
        """
        until = self._reject_next_log.get(key, 0.0)
        return now < until <= now + tuning.REJECT_LOG_INTERVAL_S

    def _refused(self, what: str, counter: str, now: float) -> None:
        """Log what a cardinality guard kept out (the core counted it), at most once per interval."""
        counters = self.core.counters
        if not self._quiet(counter, now):
            self._reject_next_log[counter] = now + tuning.REJECT_LOG_INTERVAL_S
            log.warning("refusing %s; counted in %s (%d so far)", what, counter, counters[counter])

    def _account_drops(self, source: _Source, drops: int) -> None:
        """Fold a reading of the socket's cumulative (uint32) drop counter into kernel_drops."""
        delta = (drops - source.drops) & 0xFFFFFFFF
        if 0 < delta < 1 << 31:  # an older reading (from an earlier-queued datagram) is behind: ignore
            self.core.counters["kernel_drops"] += delta
            source.drops = drops

    def _poll_drops(self) -> None:
        """Catch up on drops no datagram has reported yet (before a flush or a status line)."""
        for source in self._sources:
            drops = net.read_drops(source.sock)
            if drops is not None:
                self._account_drops(source, drops)

    def _rejected(self, source: _Source, exc: DecodeError, address, now: float) -> None:
        reason = exc.reason
        key = f"rejected:{reason}"
        counters = self.core.counters
        if self._quiet(reason, now):
            return
        if address is None:
            # Read from the fast path without a source: log the next one with
            # it, or, if none comes before the next flush, this one without.
            source.want_source_until = now + tuning.REJECT_LOG_INTERVAL_S
            self._unlogged_rejects[reason] = (str(exc), source.endpoint.label)
            return
        source.want_source_until = 0.0
        self._unlogged_rejects.pop(reason, None)
        self._reject_next_log[reason] = now + tuning.REJECT_LOG_INTERVAL_S
        log.warning(
            "rejected datagram from %s on %s: %s (%d %s so far; at most one line per %g s per reason)",
            _source_text(address),
            source.endpoint.label,
            exc,
            counters[key],
            reason,
            tuning.REJECT_LOG_INTERVAL_S,
        )

    def _log_unlogged_rejects(self) -> None:
        """A burst of rejected datagrams read on the fast path (no source address)
        and nothing after it: log each reason now, without the source, so a
        burst never goes unlogged (still at most one line per reason per interval)."""
        if not self._unlogged_rejects:
            return
        now = self.clock()
        counters = self.core.counters
        for reason, (message, label) in self._unlogged_rejects.items():
            if self._quiet(reason, now):
                continue
            self._reject_next_log[reason] = now + tuning.REJECT_LOG_INTERVAL_S
            log.warning(
                "rejected datagram from a source not recorded (read in a burst) on %s: %s (%d %s so far; at most "
                "one line per %g s per reason)",
                label,
                message,
                counters[f"rejected:{reason}"],
                reason,
                tuning.REJECT_LOG_INTERVAL_S,
            )
        self._unlogged_rejects.clear()

    # --- accounts ----------------------------------------------------------------------

    def _lost(self) -> int:
        return self.core.lost()

    def _log_status(self, now: float) -> None:
        then, before, lost_before = self._status_base
        c = self.core.counters
        span = max(now - then, 1e-9)
        lost = self._lost()
        rejected = {k.split(":", 1)[1]: int(v) for k, v in c.items() if k.startswith("rejected:") and v}
        rejected_total = sum(rejected.values())
        log.info(
            "status: received %d (%.1f/s) stored %d (%.1f/s) readings %d (%.1f/s) duplicates %d "
            "lost %d (+%d) rejected %d %s kernel_drops %d truncated %d storage_dropped %d backlog %d sensors %d",
            c["received"],
            (c["received"] - before.get("received", 0)) / span,
            c["stored"],
            (c["stored"] - before.get("stored", 0)) / span,
            c["stored_readings"],
            (c["stored_readings"] - before.get("stored_readings", 0)) / span,
            c["duplicates"],
            lost,
            lost - lost_before,
            rejected_total,
            " ".join(f"{k}={v}" for k, v in sorted(rejected.items())) or "-",
            c["kernel_drops"],
            c["truncated"],
            c["storage_dropped"],
            self.core.pending_readings,
            len(self.core.sensors),
        )
        self._status_base = (now, dict(c), lost)


def _source_text(address) -> str:
    if not address:
        return "an unknown source"
    return net.format_address(address)
