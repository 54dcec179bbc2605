"""`telemetry-uplink consume`: many gateways' streams into one central database.

A durable pull consumer with explicit acks: fetch a batch, decode it
(core.decode; a malformed message is counted by reason and terminated, so it
is never redelivered), write the batch in one transaction (central.Central),
and ack each message only after the COMMIT.  A crash between COMMIT and the
acks redelivers the batch, which the idempotent writes drop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
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


async def _now(decode, data: bytes):
    return decode(data)


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
    head_budget: int = store.HEAD_BUDGET_BYTES  # bytes of open heads at most (the largest close early past it)


class Consumer:
    def __init__(self, settings: ConsumeSettings, notify=lambda message: False) -> None:
        self.s = settings
        self.notify = notify
        self.opts = broker.connect_options(settings.broker)
        workers = closer.default_workers() if settings.close_workers is None else settings.close_workers
        self.central = central.Central(settings.db, workers, settings.head_budget)
        gc.freeze()  # what start-up loaded (the open heads) stays out of the collector's passes
        self.stop = asyncio.Event()
        self.backoff = core.Backoff(0.1, settings.backoff_max)
        self.server_index = 0
        self.totals: Counter = Counter()
        self.reconnects = 0
        self._connects = 0
        self.connected_to: str | None = None

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
            else f"{closer.workers} worker process{'es' if closer.workers > 1 else ''} "
            + ("decode messages and close heads into chunks" if closer.decodes else "close heads into chunks"),
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
            except nats.errors.TimeoutError:
                self.central.settle()  # the chunks the workers closed, not left waiting for a message
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
            finally:
                gc.enable()
            self.backoff.reset()
            self.notify("WATCHDOG=1")

    def _decoded(self, msgs: list) -> Iterator[Awaitable]:
        """Each message's item (prepared.prepare: core.decode's, a payload-3 columns message as a
        prepared.Prepared), in order: with DECODE_FROM_WORKERS workers or more, decoded in them,
        PREPARE_AHEAD messages per worker ahead of the writer; with fewer (or when one dies, or
        cannot decode it) here."""
        closer = self.central.closer
        if closer is None or not closer.decodes:
            for m in msgs:
                yield _now(core.decode, m.data)
            return
        ahead = PREPARE_AHEAD * closer.workers
        sent: deque = deque()
        at = 0
        for m in msgs:
            while at < len(msgs) and len(sent) < ahead:
                sent.append(closer.prepare(msgs[at].data))
                at += 1
            job = sent.popleft()
            yield self._prepared(closer, job, m.data)

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
        done = self.central.apply(items, rejected)
        self.totals.update(done)
        for m in good:
            await m.ack()
        for m in bad:
            await m.term()

    def _summary(self) -> str:
        t = self.totals
        return (
            f"{t['uplink_messages']} messages, {t['uplink_readings']} readings stored, "
            f"{t['uplink_replayed_readings']} replayed readings dropped, {t['uplink_accounts']} account "
            f"snapshots ({t['uplink_stale_accounts']} stale), "
            f"{sum(v for k, v in t.items() if k.startswith('uplink_rejected:'))} rejected"
        )

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.s.status_interval)
            where = f"connected to {self.connected_to}" if self.connected_to else "NOT connected"
            line = f"status: {self._summary()}; reconnects {self.reconnects}; {where}"
            log.info("%s", line)
            self.notify(f"STATUS={line[8:]}")
