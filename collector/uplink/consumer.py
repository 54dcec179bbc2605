"""`telemetry-uplink consume`: many gateways' streams into one central database.

A durable pull consumer with explicit acks: fetch a batch, decode it
(core.decode; a malformed message is counted by reason and terminated, so it
is never redelivered), write the batch in one transaction (central.Central),
and ack each message only after the COMMIT.  A crash between COMMIT and the
acks redelivers the batch, which the idempotent writes drop.

A write that fails is never left to wedge the consumer (docs/OPERATIONS.md
"A write that fails"): when the database cannot take writes (busy, locked,
the disk full, an I/O error, or even an empty transaction fails) the batch is
tried again with bounded, jittered backoff, its messages kept from redelivery
(`in_progress`), said once and once more when writes work again.  When the
database takes an empty transaction but not the batch, a message of it cannot
be written (a poison message: it passed the decoder and breaks a constraint):
the batch is written message by message, and one that fails alone
QUARANTINE_ATTEMPTS times is set aside in `uplink_quarantine` (payload kept),
counted in `uplink_quarantined`, logged at ERROR with gateway, subject and
stream sequence, and terminated; every other message is written.  A chunk the
database refuses (a head closed by a worker or the writer) is set aside the
same way by the writer itself, as payload-1 messages (central.Central._chunk_refused).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig

from .. import store
from ..errors import ConfigError, SetupError
from . import broker, central, closer, core, prepared

log = logging.getLogger("uplink.consume")

# Readings written per transaction at most (then acked), whatever the fetch held.
TXN_READINGS = 200_000
# Messages handed to each worker to decode ahead of the writer (each ~0.5 MB in, ~1 MB of arrays
# and packed groups out): enough to keep it busy, few enough that a head it must close next does
# not wait behind many.
PREPARE_AHEAD = 2
# Tries of one message alone, the database taking writes, before it is set aside (quarantined).
QUARANTINE_ATTEMPTS = 3
# A failed write that may succeed later unchanged (the central writer decides the same for a chunk).
transient = central.transient


class Stopping(Exception):
    """The consumer stops while a write waits for the database: nothing is acked (redelivered)."""


# Open heads of the central writer at most (bytes): twice the collector's (store.HEAD_BUDGET_BYTES).
# Under the collector's 48 MiB, 3 gateways of 2,000 sensors closed heads at ~470 datagrams; with 96
# they close at ~1,000 and a chunk's cost is mostly per chunk, not per datagram: 20-35 % less CPU
# per reading for ~80-110 MB more RSS (bench/central_core.py --head-budget, docs/OPERATIONS.md).
HEAD_BUDGET_BYTES = 2 * store.HEAD_BUDGET_BYTES


async def _now(decode, data: bytes):
    return decode(data)


def _ready(data: bytes):
    """What the writer makes of a message it decodes itself: as a worker makes it (prepared.prepare:
    a payload-3 columns message as a Prepared, read from its bytes as arrays), with the message
    kept for the block-by-block way (Central.apply)."""
    item = prepared.prepare(data)
    if isinstance(item, prepared.Prepared):
        item.payload = data
    return item


@dataclass(frozen=True)
class ConsumeSettings:
    db: str
    broker: broker.BrokerSettings = field(default_factory=broker.BrokerSettings)
    durable: str = "telemetry-central"
    batch: int = 50  # messages per fetch (and per transaction) at most; each <= 1 MiB
    ack_wait: float = 30.0  # seconds before JetStream redelivers an unacked message
    backoff_max: float = 30.0
    status_interval: float = 60.0
    close_workers: int | None = None  # processes closing heads into chunks (None: closer.default_workers())
    head_budget: int = HEAD_BUDGET_BYTES  # bytes of open heads at most (the largest close early past it)
    max_heads: int = store.MAX_OPEN_HEADS  # open heads at most (the least recently written close past it)
    retain: float = 0.0  # seconds of raw readings kept (0: for ever); older ones that arrive are not stored


class _CannotWrite(Exception):
    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exc = exc


class Consumer:
    def __init__(self, settings: ConsumeSettings, notify=lambda message: False) -> None:
        self.s = settings
        self.notify = notify
        self.opts = broker.connect_options(settings.broker)
        workers = closer.default_workers() if settings.close_workers is None else settings.close_workers
        self.central = central.Central(
            settings.db,
            workers,
            settings.head_budget,
            settings.max_heads,
            settings.broker.subject_prefix,
            settings.retain,
        )
        gc.freeze()  # what start-up loaded (the open heads) stays out of the collector's passes
        self.stop = asyncio.Event()
        self.backoff = core.Backoff(0.1, settings.backoff_max)
        self.server_index = 0
        self.totals: Counter = Counter()
        self._shared_at = 0  # messages seen by _decoded (which of them go to the workers)
        self.reconnects = 0
        self._connects = 0
        self.connected_to: str | None = None
        self.write_backoff = core.Backoff(0.1, settings.backoff_max)
        self.failing_since: float | None = None  # monotonic: the database refuses writes since
        self.write_retries = 0  # in the current failure episode

    async def _sleep(self, seconds: float) -> None:
        await broker.watchful_sleep(seconds, self.stop, self.notify)

    async def run(self) -> None:
        self.notify("READY=1")
        closer = self.central.closer
        log.info(
            "started: central database %s, servers %s, stream %s, durable consumer %s; %s",
            self.s.db,
            ",".join(self.s.broker.servers),
            self.s.broker.stream,
            self.s.durable,
            "no worker processes: the writer decodes and closes everything"
            if closer is None
            else f"{closer.workers} worker processes decode messages and close heads into chunks"
            if closer.share >= 1
            else f"{closer.workers} worker process closes heads into chunks and decodes "
            f"{closer.share:.0%} of the messages",
        )
        status_task = asyncio.create_task(self._status_loop())
        try:
            while not self.stop.is_set():
                servers = self.s.broker.servers
                server = servers[self.server_index % len(servers)]
                self.server_index += 1
                nc = None
                try:
                    nc = await broker.connect(self.s.broker, self.opts, "telemetry-uplink consume", server)
                    js = nc.jetstream(timeout=10)
                    await broker.ensure_stream(js, self.s.broker)
                    sub = await js.pull_subscribe(
                        f"{self.s.broker.subject_prefix}.>",
                        durable=self.s.durable,
                        stream=self.s.broker.stream,
                        config=ConsumerConfig(
                            ack_policy=AckPolicy.EXPLICIT,
                            ack_wait=self.s.ack_wait,
                            max_ack_pending=max(1000, 4 * self.s.batch),
                        ),
                    )
                    self._connects += 1
                    self.reconnects += self._connects > 1
                    self.connected_to = server
                    log.info("connected to %s", server)
                    await self._loop(nc, sub)
                except (SetupError, ConfigError) as exc:
                    if isinstance(exc, ConfigError) and "does not exist" in str(exc):
                        delay = self.backoff.next()
                        log.warning("broker %s: %s; retrying in %.1f s", server, exc, delay)
                        await self._sleep(delay)
                        continue
                    raise
                except Exception as exc:
                    delay = self.backoff.next()
                    log.warning("broker %s: %s; retrying in %.1f s", server, broker.explain(exc), delay)
                    await self._sleep(delay)
                finally:
                    self.connected_to = None
                    if nc is not None:
                        try:
                            await asyncio.wait_for(nc.close(), timeout=2)
                        except Exception:
                            pass
        finally:
            status_task.cancel()
            self.notify("STOPPING=1")
            self.central.close()
            log.info("stopped: %s", self._summary())

    async def _loop(self, nc, sub) -> None:
        while not self.stop.is_set():
            if not nc.is_connected:
                raise nats.errors.ConnectionClosedError()
            try:
                msgs = await sub.fetch(self.s.batch, timeout=1.0)
            except TimeoutError:  # nats.errors.TimeoutError, or asyncio's that nats-py's fetch raises itself
                # the chunks the workers closed, not left waiting for a message
                try:
                    await self._write(self.central.settle, [])
                except Stopping:
                    return
                self.central.maintain()
                self.notify("WATCHDOG=1")
                continue
            # Decoded message by message; written (and then acked) whenever TXN_READINGS readings
            # are gathered: a fetch of large payload-2 messages never sits decoded in memory whole.
            # The cyclic garbage collector is off meanwhile: decoding builds hundreds of thousands
            # of lists that live until the COMMIT, and its passes over them (and over the open
            # heads) more than doubled the CPU per reading; nothing here makes reference cycles,
            # and it runs again between fetches.
            gc.disable()
            try:
                await self._take(msgs)
            except Stopping:
                return
            finally:
                gc.enable()
            self.central.maintain()
            self.backoff.reset()
            self.notify("WATCHDOG=1")

    def _decoded(self, msgs: list) -> Iterator[Awaitable]:
        """Each message's item (prepared.prepare: core.decode's, a payload-3 columns message as a
        prepared.Prepared), in order: closer.share of them (all with DECODE_FROM_WORKERS workers
        or more, every third with one) decoded in the workers, PREPARE_AHEAD messages per worker
        ahead of the writer; the others (and when a worker dies, or cannot decode one) here."""
        closer = self.central.closer
        if closer is None:
            for m in msgs:
                yield _now(_ready, m.data)
            return
        # The workers' share of the messages (closer.share: all of them from DECODE_FROM_WORKERS
        # on), spread evenly over the stream: message k goes when floor((k + 1) * share) moves.
        share, k0 = closer.share, self._shared_at
        self._shared_at += len(msgs)
        chosen = [i for i in range(len(msgs)) if int((k0 + i + 1) * share) > int((k0 + i) * share)]
        ahead = PREPARE_AHEAD * closer.workers
        sent: deque = deque()
        at = 0
        for i, m in enumerate(msgs):
            while at < len(chosen) and len(sent) < ahead:
                sent.append((chosen[at], closer.prepare(msgs[chosen[at]].data)))
                at += 1
            if sent and sent[0][0] == i:
                yield self._prepared(closer, sent.popleft()[1], m.data)
            else:
                yield _now(_ready, m.data)

    async def _prepared(self, closer, job, data: bytes):
        if job is None:
            return core.decode(data)
        pool, future = job
        try:
            item = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not future.cancelled() or (task is not None and task.cancelling()):
                raise
            return core.decode(data)  # its pool was shut down under it: a worker died (closer._died)
        except core.PayloadError:
            raise
        except (BrokenProcessPool, OSError, EOFError) as exc:
            closer._died(exc, pool)
            return core.decode(data)
        except Exception as exc:  # what the worker could not make of it, this process decides
            log.debug("a worker could not prepare a message (%s); decoding it here", exc)
            return core.decode(data)
        if isinstance(item, prepared.Prepared):
            item.payload = data
        return item

    async def _take(self, msgs: list) -> None:
        items: list = []
        good: list = []
        bad: list = []
        rejected: Counter = Counter()
        readings = 0
        for m, decoded in zip(msgs, self._decoded(msgs)):
            try:
                item = await decoded
            except core.PayloadError as exc:
                rejected[exc.reason] += 1
                bad.append(m)
                log.warning("rejected a message on %s: %s", m.subject, exc)
                continue
            items.append(item)
            good.append(m)
            if isinstance(item, (core.Readings, core.Columns, core.Blocks, prepared.Prepared)):
                readings += item.readings
            if readings >= TXN_READINGS:
                await self._commit(items, good, bad, rejected)
                items, good, bad, rejected, readings = [], [], [], Counter(), 0
        if items or bad:
            await self._commit(items, good, bad, rejected)

    async def _commit(self, items: list, good: list, bad: list, rejected: Counter) -> None:
        """Write the batch and ack it; a poison message in it is set aside (terminated), the
        others written one by one.  Stopping raised when the consumer stops first."""
        aside = await self._apply(items, good, rejected)
        for m in good:
            if id(m) not in aside:
                await m.ack()
        for m in bad:
            await m.term()

    async def _apply(self, items: list, msgs: list, rejected: Counter | None) -> set[int]:
        """Write items (from msgs, in order) in one transaction, or, when one of them cannot be
        written, message by message; returns the ids of the messages set aside (terminated)."""
        attempts = 0
        while True:
            try:
                done = await self._write(lambda: self.central.apply(items, rejected), msgs)
            except _CannotWrite as failed:
                attempts += 1
                exc = failed.exc
            else:
                self.totals.update(done)
                return set()
            if len(items) > 1:  # which one: each alone, the others go through
                aside: set[int] = set()
                for item, m in zip(items, msgs):
                    aside |= await self._apply([item], [m], None)
                if rejected:
                    await self._apply([], [], rejected)
                return aside
            if not items or attempts < QUARANTINE_ATTEMPTS:
                log.debug("a write failed (%s: %s); attempt %d", exc.__class__.__name__, exc, attempts)
                await self._pause(msgs)
                continue
            await self._set_aside(items[0], msgs[0], exc, attempts)
            self.write_backoff.reset()
            return {id(msgs[0])}

    async def _write(self, write, msgs: list):
        """write() (one transaction), tried again with bounded, jittered backoff while the
        database cannot take writes (said once per episode, and when it can again; the messages
        kept from redelivery meanwhile).  _CannotWrite when the database takes an empty
        transaction but not this one: the messages' content is at fault."""
        while True:
            try:
                result = write()
            except Exception as exc:
                if not transient(exc) and self._writable():
                    raise _CannotWrite(exc) from exc
                self._failing(exc)
                await self._pause(msgs)
                continue
            if self.failing_since is not None:
                log.info(
                    "the central database takes writes again, after %d retries in %.1f s",
                    self.write_retries,
                    time.monotonic() - self.failing_since,
                )
                self.failing_since = None
                self.write_retries = 0
                self.write_backoff.reset()
            return result

    def _writable(self) -> bool:
        """Whether the database takes an empty transaction (its counters' last_flush)."""
        try:
            self.central.apply([])
        except Exception:
            return False
        return True

    def _failing(self, exc: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            self.write_retries = 0
            log.warning(
                "cannot write the central database (%s: %s): retrying with backoff up to %.1f s, the messages "
                "held unacked (said once; again when writes work)",
                exc.__class__.__name__,
                exc,
                self._pause_cap(),
            )
        else:
            self.write_retries += 1
            log.debug("the central database still refuses writes (%s: %s)", exc.__class__.__name__, exc)

    def _pause_cap(self) -> float:
        return min(self.s.backoff_max, self.s.ack_wait / 2)

    async def _pause(self, msgs: list) -> None:
        """A backoff step; the messages' ack deadline pushed back first (JetStream redelivers
        them elsewhere only if this process is gone)."""
        for m in msgs:
            await m.in_progress()
        await self._sleep(min(self.write_backoff.next(), self._pause_cap()))
        if self.stop.is_set():
            raise Stopping()

    async def _set_aside(self, item, m, exc: BaseException, attempts: int) -> None:
        """Keep a message that cannot be written in uplink_quarantine, count it, say so loudly
        and terminate it (JetStream does not redeliver it)."""
        seq = m.metadata.sequence.stream
        gateway = getattr(item, "gateway", None) or "?"
        error = f"{exc.__class__.__name__}: {exc}"
        qid = await self._write(
            lambda: self.central.quarantine(gateway, m.subject, seq, error, m.data, time.time()), [m]
        )
        self.totals["uplink_quarantined"] += 1
        log.error(
            "set aside a message that cannot be written: gateway %s, subject %s, stream sequence %d (%s; "
            "%d attempts); kept in uplink_quarantine id %d, terminated, the others written",
            gateway,
            m.subject,
            seq,
            error,
            attempts,
            qid,
        )
        await m.term()

    def _summary(self) -> str:
        t = self.totals
        return (
            f"{t['uplink_messages']} messages, {t['uplink_readings']} readings stored, "
            f"{t['uplink_replayed_readings']} replayed readings dropped"
            + (f", {t['uplink_expired_readings']} older than the retention" if t["uplink_expired_readings"] else "")
            + f", {t['uplink_accounts']} account "
            f"snapshots ({t['uplink_stale_accounts']} stale), "
            f"{sum(v for k, v in t.items() if k.startswith('uplink_rejected:'))} rejected, "
            f"{t['uplink_quarantined']} set aside"
        )

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.s.status_interval)
            where = f"connected to {self.connected_to}" if self.connected_to else "NOT connected"
            line = f"status: {self._summary()}; reconnects {self.reconnects}; {where}"
            log.info("%s", line)
            self.notify(f"STATUS={line[8:]}")
