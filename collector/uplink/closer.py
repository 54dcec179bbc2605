"""Closing heads into chunks in worker processes, for the central consumer's one writer.

Encoding a closing head (chunkstore.Head.close: the codec, statistics,
rollups, minute blocks) is pure and per series, and it is a third of the
consumer's CPU.  The Store hands the heads a transaction closes to
`Closer.__call__` (Store.close_later) and inserts their chunks at the start of
its next transaction; meanwhile the writer decodes and merges the next fetch,
so the second core works.  The workers hold nothing that matters: they get
each head (its arrays, pickled as bytes) and return its ChunkRow, a
transaction's heads closed together (chunkstore.close_heads).  They also
decode messages ahead of the writer (`prepare`, prepared.py): all of them from
DECODE_FROM_WORKERS workers on, every third with one (ONE_WORKER_SHARE).  A worker that dies (kill -9, out of memory)
costs nothing but time: the writer decodes those messages and closes those
heads itself, says so once in the log, and starts a new pool.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

from ..chunkstore import ChunkRow, Head, close_heads
from . import prepared

log = logging.getLogger("uplink.consume")

PR_SET_PDEATHSIG = 1


# Workers decode messages too (prepare) only from this many on: decoding and merging a message
# costs the worker a little more than it saved the writer (measured: writer 12.3 -> 2.7 CPU s,
# worker 9.3 -> 18.8 s for 5.4 M readings, bench/central_core.py), so one worker would carry
# nearly everything while the writer idles; with two or more the work spreads.
DECODE_FROM_WORKERS = 2
# With one worker it decodes this share of the messages (every third): closing got ~2x cheaper
# (chunkstore.close_heads), and the writer, which decodes the rest, became the bound with the
# worker idle two thirds of the time (bench/uplink.py --central-only: writer 17-19 CPU s,
# worker 5.5-6.3 s for 12.6 M readings).
ONE_WORKER_SHARE = 1 / 3


def default_workers() -> int:
    """One worker per core beyond the writer's, at most 4 (closing is a third of the work)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


# Held (blocked) in the writer's thread while it hands the pool work, which is when the pool
# forks its workers, and in each worker until _die_with_parent has undone the writer's handlers.
_HELD_AT_FORK = {signal.SIGTERM, signal.SIGINT}


def _die_with_parent() -> None:
    """In a worker: SIGKILL when the writer process is gone (Linux prctl PR_SET_PDEATHSIG); the
    writer's signal handling undone.  The fork inherits asyncio's wake-up fd: a SIGTERM to a
    worker (the pool terminates the others when one dies) was written into it and read by the
    writer's loop as its own SIGTERM, and the consumer stopped (tests/test_uplink_gateways.py).
    The worker is born with SIGTERM and SIGINT blocked (_submit): one sent before this ran
    waits, and is taken with the handlers undone (tests/test_uplink_closer.py)."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the writer, which ends the pool
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD_AT_FORK)
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pool's own EOF handling only
        return
    if os.getppid() != parent:  # it died before the prctl took effect
        os._exit(1)


def _submit(pool: ProcessPoolExecutor, fn, *args) -> Future:
    """pool.submit with SIGTERM and SIGINT blocked in this thread: a fork-context pool forks its
    workers inside its first submit, and a fork inherits the mask, so a signal sent to a new
    worker before its initializer has run waits for it (instead of running the writer's
    handler in the worker, which writes into the writer's wake-up fd).  Signals sent to the
    writer meanwhile are taken by its other threads, or when the mask is restored."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_AT_FORK)
    try:
        return pool.submit(fn, *args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class _Pending:
    """The chunk rows of one transaction's closing heads, as Store.close_later expects."""

    def __init__(self, closer: Closer, parts: list[list[Head]], futures: list, fast: bool) -> None:
        self.closer = closer
        self.parts = parts
        self.futures = futures
        self.fast = fast
        self._rows: list[ChunkRow] | None = None

    def ready(self) -> bool:
        return all(sent is None or sent[1].done() for sent in self.futures)

    def rows(self) -> list[ChunkRow]:
        if self._rows is None:
            out: list[ChunkRow] = []
            for part, sent in zip(self.parts, self.futures):
                got = None
                if sent is not None:
                    try:
                        got = sent[1].result()
                    except (BrokenProcessPool, OSError, EOFError) as exc:
                        self.closer._died(exc, sent[0])
                    except CancelledError:  # its pool was shut down under it: a worker died (_died)
                        pass
                if got is None:
                    got = close_heads(part, self.fast)
                    self.closer.closed_here += len(part)
                out += got
            self._rows = out
        return self._rows


class Closer:
    """Store.close_later backed by `workers` processes."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        # The share of the messages the writer hands them to decode (prepare)
        self.share = 1.0 if workers >= DECODE_FROM_WORKERS else ONE_WORKER_SHARE
        self.pool: ProcessPoolExecutor | None = None
        self.closed_here = 0  # heads the writer closed itself because a worker died
        self.deaths = 0
        self.unavailable: str | None = None  # why no worker can start: the writer closes every head

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            # Forked (no helper process stays behind, as spawn's resource tracker would; the
            # workers touch nothing of the writer's but the heads they are sent), and gone with
            # the writer: a worker must not outlive a kill -9 of it holding its descriptors.
            self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("fork"), initializer=_die_with_parent)
        return self.pool

    def _started(self) -> ProcessPoolExecutor | None:
        """The pool, None when no worker can start (said once): the writer does their work."""
        if self.unavailable is not None:
            return None
        try:
            return self._pool()
        except OSError as exc:  # no POSIX semaphores (/dev/shm), no processes left, ...
            self.unavailable = f"{exc.__class__.__name__}: {exc}"
            log.warning(
                "cannot start worker processes (%s): the writer decodes every message and closes every head itself",
                self.unavailable,
            )
            return None

    def pids(self) -> list[int]:
        """The workers' process ids (those started so far)."""
        procs = getattr(self.pool, "_processes", None) or {}
        return sorted(procs)

    def __call__(self, heads: list[Head], fast: bool) -> _Pending:
        # About equal datagrams per worker, heads kept in order within each part.
        parts: list[list[Head]] = []
        if len(heads) <= 1 or self.workers == 1:
            parts = [heads]
        else:
            share = sum(len(h) for h in heads) / self.workers
            parts, at = [[]], 0
            for h in heads:
                if at >= share * len(parts) and len(parts) < self.workers:
                    parts.append([])
                parts[-1].append(h)
                at += len(h)
        futures: list[tuple[ProcessPoolExecutor, Future] | None] = []
        for part in parts:
            if self.unavailable is not None:
                futures.append(None)
                continue
            pool = self._started()
            if pool is None:
                futures.append(None)
                continue
            try:
                # chunkstore.close_heads in the worker: a Head pickles as its arrays' bytes
                futures.append((pool, _submit(pool, close_heads, part, fast)))
            except (BrokenProcessPool, RuntimeError, OSError) as exc:
                self._died(exc, pool)
                futures.append(None)
        return _Pending(self, parts, futures, fast)

    def prepare(self, data: bytes) -> tuple[ProcessPoolExecutor, Future] | None:
        """A message decoded and prepared for the writer in a worker (prepared.prepare): the
        pool and the future of its result, or None when no worker can take it (the writer
        decodes it itself)."""
        pool = self._started()
        if pool is None:
            return None
        try:
            return pool, _submit(pool, prepared.prepare, data)
        except (BrokenProcessPool, RuntimeError, OSError) as exc:
            self._died(exc, pool)
            return None

    def _died(self, exc: BaseException, pool: ProcessPoolExecutor) -> None:
        """A worker of `pool` is gone: the writer closes its heads itself; a new pool for the next ones."""
        if pool is self.pool:
            self.deaths += 1
            log.warning(
                "a worker process died (%s): the writer decodes its messages and closes its heads itself "
                "(nothing is lost); starting new workers",
                exc.__class__.__name__,
            )
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
