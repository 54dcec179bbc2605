"""Tuning constants of the collector, each with its unit and the reason for its value.

Every number the receive loop, the socket set-up or the batch writer depends on
lives here, so an operator reading docs/OPERATIONS.md and a developer reading
the code talk about the same figures.  Defaults are chosen for a small
gateway box (one or two cores, a few hundred MB of RAM, flash storage).
"""

from __future__ import annotations

# --- defaults of the command line -------------------------------------------------------

DEFAULT_UDP_PORT = 4739
DEFAULT_DB_PATH = "telemetry.db"
DEFAULT_LISTEN_HOST = "0.0.0.0"
DEFAULT_FLUSH_INTERVAL_S = 1.0
# Readings that make a flush happen before the interval is up: it bounds how
# long one flush holds the loop (the socket buffer absorbs that); smaller
# batches pay the per-commit cost more often.  Figures: docs/OPERATIONS.md, Tuning.
DEFAULT_BATCH_ROWS = 20_000
# What we ask the kernel for.  Linux doubles the request (bookkeeping
# overhead) and caps it at net.core.rmem_max unless SO_RCVBUFFORCE is allowed
# (CAP_NET_ADMIN).  How long the granted buffer lasts: docs/OPERATIONS.md,
# Receive buffers.
DEFAULT_RCVBUF_BYTES = 8 * 1024 * 1024
DEFAULT_STATUS_INTERVAL_S = 60.0

# --- the receive loop ------------------------------------------------------------------

# Largest read per recv.  Bigger than any UDP payload that is not an IPv6
# jumbogram (65,507 over IPv4, 65,527 over IPv6), so oversized datagrams are
# read whole and rejected as too_large by the decoder; only a jumbogram can
# still come back truncated (MSG_TRUNC), and it is counted, never half-stored.
# It is also the cheaper size: CPython shrinks the buffer in place.
RECV_BUFFER_BYTES = 65536
# Datagrams read from one socket per wake before moving to the next ready one,
# so a flooded socket cannot starve the others (a few ms of work per wake).
DRAIN_BUDGET_DATAGRAMS = 256
# Datagrams per recvmmsg(2) call (collector/mmsg.py), each in a slot of
# RECV_BUFFER_BYTES: 4 MiB of address space, of which only the pages the
# kernel writes (about one per slot in use) become resident.
RECVMMSG_VLEN = 64
# Under continuous traffic a head at its count closes between two drains only
# while every socket's queue is under this share of its buffer (SO_MEMINFO):
# closing while a backlog waits (after the CPU was taken away) slows the
# catch-up, and a fuller queue overflows sooner (collector/server.py).
CLOSE_QUEUE_FILL_MAX = 0.25
# The longest one select() waits (seconds): epoll takes at most 2**31-1 ms,
# and --flush-interval / --status-interval may be longer, even inf.
MAX_SELECT_TIMEOUT_S = 3600.0
# The GIL switch interval telemetry-collector serves with (Python's: 5 ms): the
# loop gives the GIL up in select() and may wait this long to get it back from
# the writer thread (bench/ingest_stalls.py --switch-interval; docs/OPERATIONS.md).
WRITER_SWITCH_INTERVAL_S = 0.0005
# The maintenance step (retention, disk budget, scrub: collector/retention.py)
# follows a flush at most this often (seconds; or every --flush-interval, if
# shorter): its own transaction took ~0.6 ms, after each of the ~30 flushes a
# second of 5-reading datagrams at 120,000/s.  Ten steps a second still free
# 640 chunks a second under --max-disk (CHUNKS_PER_STEP), over 3x what 200,000
# datagrams/s close.
MAINTAIN_MIN_INTERVAL_S = 0.1
# gc's youngest-generation threshold telemetry-collector serves with (Python's:
# 700): what a flush allocates stays alive until its transaction ends, so
# collecting it at 700 only traced it again (collector/server.py; with 100
# sensors no collection runs at all, with 2,000 sensors a few: bench/ingest_core.py).
# Garbage cycles wait for at most this many new containers.
GC_THRESHOLD0 = 50_000
# At most one rejected-datagram log line per reason in this many seconds.
REJECT_LOG_INTERVAL_S = 10.0

# Cardinality guards: anyone can send UDP, so sensor ids and metric names are
# attacker-controlled.  These bound cardinality, not a small gateway's memory
# (what one sensor can cost: docs/OPERATIONS.md, Tuning; a tracker holds at
# most two 4,608-bit window bitmaps, ~2 KB, measured by bench/tracker_memory.py).
# Beyond them datagrams from new sensors (refused_sensors) and readings with new
# metric names (refused_readings) are counted, not kept.
MAX_SENSORS = 20_000
MAX_SERIES_PER_SENSOR = 256

# --- the batch writer ------------------------------------------------------------------

# Rows kept in memory while the database refuses writes (disk full, locked).
# A row tuple costs ~150 bytes in CPython, so 500,000 rows is ~75 MB; beyond
# it the oldest rows are dropped and counted in storage_dropped.  While a write
# is out in the writer thread, the loop stops reading at this many readings
# waiting (the kernel's buffer holds the rest; its drops are kernel_drops).
MAX_BACKLOG_ROWS = 500_000
# Retry a failed flush after this delay, doubling up to the maximum (seconds).
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0
# The writer must not block the receive loop for long: a competing writer
# (there should be none) makes a flush fail fast and retry, instead of
# holding the loop for open_writer's default 5 s while the socket buffer fills.
WRITER_BUSY_TIMEOUT_MS = 200
# SQLite page cache of the writer connection (KiB; PRAGMA cache_size=-N): the
# flush touches the log's tail, chunk and rollup pages and the sensors table;
# a warm cache keeps them from being re-read.
WRITER_CACHE_KIB = 32 * 1024
# systemd watchdog pings at most this often (seconds); sdnotify rate-limits too.
WATCHDOG_MIN_INTERVAL_S = 2.0

# --- Linux socket options the socket module may not name -------------------------------

SO_RXQ_OVFL = 40  # asm-generic/socket.h: cumulative drop count in ancillary data
SO_MEMINFO = 55  # asm-generic/socket.h: u32[SK_MEMINFO_VARS], Linux 4.12+
SK_MEMINFO_DROPS = 8  # linux/sock_diag.h: index of the socket's drop count
SO_RCVBUFFORCE = 33  # asm-generic/socket.h: SO_RCVBUF beyond rmem_max, needs CAP_NET_ADMIN
IP_MULTICAST_ALL = 49  # linux/in.h
IPV6_MULTICAST_ALL = 29  # linux/in6.h (kernel 4.20+)
