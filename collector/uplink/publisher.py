"""`telemetry-uplink run`: the collector's committed data to JetStream, at least once.

One round: read the ingest_log entries after the acked position (and the
accounts that changed) in one read transaction, cut them into messages
(payload 2, the default: the rows' bodies as committed, packed by
core.columns_messages, nothing re-encoded; payload 1: decoded and merged per
sensor by core.batch), publish them pipelined (at most `window` acks outstanding),
and only when JetStream has acked every one of them move the position.  The
position goes to `<db>-uplink` (atomically, fsync'd) at most every
`position_interval` seconds (5) and when the uplink stops: an fsync forces an
ext4 journal commit on the disk the collector's WAL is on, and rounds come
several times a second.  A kill -9 or a power cut between two writes sends
the entries acked since the last one again (at most position_interval's
worth): JetStream drops them inside its duplicate window, the central side by
key after it.  A round that reached the newest entry sleeps poll_interval
before the next read; one cut by its limits (a backlog) is followed at once.
A failed round (broker gone, an ack timed out) is retried whole after a
jittered backoff: its messages carry the same Nats-Msg-Id, so the ones
JetStream already stored are dropped inside its duplicate window, and the
central consumer drops the rest by key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field

from ..errors import ConfigError, SetupError
from . import broker, core, source

log = logging.getLogger("uplink")


@dataclass(frozen=True)
class UplinkSettings:
    db: str
    gateway: str
    broker: broker.BrokerSettings = field(default_factory=broker.BrokerSettings)
    max_datagrams: int | None = None  # datagrams per message at most (None: core.DEFAULT_MAX_DATAGRAMS)
    payload_version: int = core.PAYLOAD_VERSION
    round_readings: int | None = None  # readings per round at most (at least one entry): bounds memory
    round_bytes: int = 4 << 20  # payload 2: bytes of compressed bodies per round at most (8 MiB: 55 MB RSS, 4: 41)
    round_entries: int = 1000  # ingest_log entries per round at most
    window: int = 512  # publishes awaiting their ack at most
    poll_interval: float = 0.5  # seconds between looks at an idle log
    position_interval: float = 5.0  # seconds between writes (fsync'd) of the acked position at most
    ack_timeout: float = 10.0  # seconds without an ack before a round is retried
    backoff_max: float = 30.0  # seconds between reconnect attempts at most
    status_interval: float = 60.0


def status_path(db: str) -> str:
    return f"{db}-uplink.status.json"


class Uplink:
    def __init__(self, settings: UplinkSettings, notify=lambda message: False, clock=time.monotonic) -> None:
        self.s = settings
        self.notify = notify
        self.clock = clock  # paces the position file's writes
        self.opts = broker.connect_options(settings.broker)  # ConfigError before anything starts
        self.stop = asyncio.Event()
        self.backoff = core.Backoff(0.1, settings.backoff_max)
        self.cursor = source.read_cursor(settings.db)  # the last id JetStream acked
        self.written = self.cursor  # the id in <db>-uplink
        self._written_at = clock()
        self.position_writes = 0
        self.reads = 0  # read transactions on the collector's database (rounds, with or without news)
        self._behind = False  # the last round was cut by its limits (a backlog)
        self._status_stale = False  # something changed since the status file was last written
        self._lost_through = 0  # the last ingest_log id said (and counted) as deleted unsent
        if settings.payload_version not in core.VERSIONS:
            raise ConfigError(f"payload version {settings.payload_version!r}: 1, 2 or 3")
        self.max_datagrams = settings.max_datagrams or core.DEFAULT_MAX_DATAGRAMS[settings.payload_version]
        # Payload 1 decodes every reading of a round (memory); payload 2 holds the bodies only.
        self.round_readings = settings.round_readings or (100_000 if settings.payload_version == 1 else 2_000_000)
        self.source: source.Source | None = None
        self.nc = None
        self.js = None
        self.server_index = 0
        self.connected_to: str | None = None
        self.stats = dict(
            sent=0, acked=0, acked_readings=0, duplicates=0, reconnects=0, rounds=0, skipped_entries=0, failed_rounds=0
        )
        self.last_ack: float | None = None
        self.last_error: str | None = None
        self.started = time.time()
        self._last_status_file = 0.0
        self._connects = 0
        self._said_no_origin = False
        self.published_counters: dict[str, int] | None = None  # the gateway counters last acked (payload 3)

    # ------------------------------------------------------------ main loop

    async def run(self) -> None:
        try:
            if source.hold_log(self.s.db):
                log.info("position 0 written to %s: the collector keeps the ingest log for this uplink", self.s.db)
        except OSError as exc:  # the directory is missing or not ours: _open_source says what to do
            log.warning("cannot write the position file %s: %s", source.cursor_path(self.s.db), exc.strerror)
        await self._open_source()
        if self.source is None:
            return
        self.notify("READY=1")
        log.info(
            "started: gateway %s, database %s (read-only), position %d, servers %s, stream %s",
            self.s.gateway,
            self.s.db,
            self.cursor,
            ",".join(self.s.broker.servers),
            self.s.broker.stream,
        )
        status_task = asyncio.create_task(self._status_loop())
        try:
            while not self.stop.is_set():
                self._save_position()
                if self._status_stale:
                    self._write_status()
                if self.nc is None or not self.nc.is_connected:
                    delay = await self._connect()
                    if delay is not None:
                        await self._sleep(delay)
                        continue
                try:
                    more = await self._round()
                except (SetupError, ConfigError):
                    raise
                except Exception as exc:  # the broker or the link failed: back off, retry the round
                    self.stats["failed_rounds"] += 1
                    delay = self.backoff.next()
                    self._problem(
                        f"publishing to {self.connected_to}: {broker.explain(exc)}; "
                        f"retrying in {delay:.1f} s (position {self.cursor} kept)"
                    )
                    await self._drop_connection()
                    await self._sleep(delay)
                    continue
                self.notify("WATCHDOG=1")
                if not more:
                    await self._sleep(self._idle_sleep())
        finally:
            status_task.cancel()
            await self._drop_connection()
            try:
                self._save_position(force=True)
            except OSError as exc:
                log.error(
                    "cannot write the position %d to %s: %s (the next start sends again what follows %d)",
                    self.cursor,
                    source.cursor_path(self.s.db),
                    exc.strerror,
                    self.written,
                )
            self._write_status(force=True)
            self.notify("STOPPING=1")
            self.source.close()
            log.info(
                "stopped: acked %d messages (%d readings) this run; position %d",
                self.stats["acked"],
                self.stats["acked_readings"],
                self.cursor,
            )

    def _save_position(self, force: bool = False) -> None:
        """Write the acked position to <db>-uplink when it moved and position_interval passed
        since the last write, or at once with `force`."""
        if self.cursor == self.written:
            return
        now = self.clock()
        if not force and now - self._written_at < self.s.position_interval:
            return
        source.write_cursor(self.s.db, self.cursor)
        self.written = self.cursor
        self._written_at = now
        self.position_writes += 1

    def _idle_sleep(self) -> float:
        """poll_interval, or less when the position is due to be written before then."""
        if self.cursor == self.written:
            return self.s.poll_interval
        due = self.s.position_interval - (self.clock() - self._written_at)
        return max(0.0, min(self.s.poll_interval, due))

    async def _sleep(self, seconds: float) -> None:
        await broker.watchful_sleep(seconds, self.stop, self.notify)

    async def _open_source(self) -> None:
        waiting = core.Backoff(0.5, 30.0)
        while not self.stop.is_set():
            try:
                self.source = source.Source(self.s.db, self.s.gateway)
                return
            except SetupError as exc:
                delay = waiting.next()
                self._problem(f"{exc}; retrying in {delay:.1f} s")
                await self._sleep(delay)

    def _problem(self, line: str) -> None:
        self.last_error = line
        log.warning("%s", line)
        self._write_status()

    # ------------------------------------------------------------ broker

    async def _connect(self) -> float | None:
        """Connect to the next server; None on success, else the delay before the next attempt."""
        servers = self.s.broker.servers
        server = servers[self.server_index % len(servers)]
        self.server_index += 1
        try:
            nc = await broker.connect(self.s.broker, self.opts, f"telemetry-uplink {self.s.gateway}", server)
        except Exception as exc:
            delay = self.backoff.next()
            self._problem(f"broker {server}: {broker.explain(exc)}; retrying in {delay:.1f} s")
            return delay
        self.nc = nc
        self.js = nc.jetstream(timeout=self.s.ack_timeout, publish_async_max_pending=self.s.window)
        try:
            await broker.ensure_stream(self.js, self.s.broker)
        except ConfigError as exc:
            await self._drop_connection()
            delay = self.backoff.next()
            self._problem(f"broker {server}: {exc}; retrying in {delay:.1f} s")
            return delay
        except Exception as exc:
            await self._drop_connection()
            delay = self.backoff.next()
            self._problem(
                f"broker {server}: stream {self.s.broker.stream}: {broker.explain(exc)}; retrying in {delay:.1f} s"
            )
            return delay
        self._connects += 1
        if self._connects > 1:
            self.stats["reconnects"] += 1
        self.connected_to = server
        self.last_error = None
        log.info("connected to %s (stream %s)", server, self.s.broker.stream)
        self._write_status(force=True)
        return None

    async def _drop_connection(self) -> None:
        nc, self.nc, self.js = self.nc, None, None
        if nc is not None:
            try:
                await asyncio.wait_for(nc.close(), timeout=2)
            except Exception:
                pass

    # ------------------------------------------------------------ one round

    async def _round(self) -> bool:
        """Publish what follows the position; True when more is waiting (the round was cut by
        its limits), False when it reached the newest entry."""
        raw = self.s.payload_version >= 2
        self.reads += 1
        snap = self.source.read(
            self.cursor, self.s.round_entries, self.round_readings, raw=raw, max_bytes=self.s.round_bytes
        )
        ids = snap.ids
        if self.cursor > snap.last_id:
            log.error(
                "position %d is beyond the newest ingest_log id %d: the database was replaced; "
                "starting again from its first entry",
                self.cursor,
                snap.last_id,
            )
            self.cursor = 0
            self._lost_through = 0
            self._save_position(force=True)
            return True
        gone: list[tuple[int, int]] = []
        # The first entry after the position, or one past the newest id ever given (its row may be
        # gone too) when there is none: what lies between was deleted before it was sent.
        first = ids[0] if ids else snap.last_id + 1
        if first > self.cursor + 1:
            gone.append((self.cursor + 1, first - 1))  # sent with every try of this round
            # Said and counted once: a round that fails finds the same hole when it is tried again.
            said = max(self.cursor, self._lost_through)
            if first - 1 > said:
                self._lost_through = first - 1
                self.stats["skipped_entries"] += first - 1 - said
                log.error(
                    "DATA LOST to the central side: ingest_log entries %d-%d were deleted before they were sent "
                    "(the collector's disk budget: its counter uplink_dropped says how many readings; "
                    "or the collector trimmed them before this uplink first ran)",
                    said + 1,
                    first - 1,
                )
                # The status file says LOST from now on, not up to a second later: whoever reads the
                # ERROR line (or sees the rows that follow it arrive centrally) finds it in `status` too.
                self._write_status(force=True)
        # Payload 3 names the rows by the database's identity; one without (a collector older
        # than payload 3 has not reopened it yet) goes as payload 2 meanwhile.
        origin = snap.origin if self.s.payload_version == 3 else None
        if self.s.payload_version == 3 and origin is None and not self._said_no_origin:
            self._said_no_origin = True
            log.warning(
                "database %s has no identity (meta.database_id) yet: sending payload 2 until a collector of "
                "this version has opened it (restart the collector)",
                self.s.db,
            )
        counters = snap.counters if origin is not None and snap.counters != self.published_counters else None
        if not ids and not gone and not snap.accounts and counters is None:
            return False
        prefix = self.s.broker.subject_prefix
        if snap.blocks is not None:
            messages = core.columns_messages(
                prefix, self.s.gateway, snap.blocks, max_datagrams=self.max_datagrams, origin=origin, gone=gone
            )
        else:
            readings = core.batch(self.s.gateway, snap.entries, self.max_datagrams)
            messages = [m for r in readings for m in core.readings_messages(prefix, r)]
        if snap.blocks is None:
            messages += [core.accounts_message(prefix, a, 1) for a in snap.accounts]
        elif origin is not None:
            if snap.accounts or counters is not None:
                messages += core.snapshots_messages(
                    prefix, self.s.gateway, snap.accounts, origin=origin, as_of=snap.last_id, counters=snap.counters
                )
        else:
            messages += core.snapshots_messages(prefix, self.s.gateway, snap.accounts)
        await self._publish(messages)
        if ids:
            self.cursor = ids[-1]
        elif gone:
            self.cursor = gone[-1][1]
        self.source.mark_published(snap.account_rows)
        if origin is not None:
            self.published_counters = snap.counters
        self.backoff.reset()
        self.last_ack = time.time()
        self.stats["rounds"] += 1
        more = bool(ids) and ids[-1] < snap.last_id
        # at once when a backlog has just drained (the operator, and bench/uplink.py's catch-up
        # time, see the position it reached), else at most once a second
        self._write_status(force=self._behind and not more)
        self._behind = more
        return more

    async def _publish(self, messages: list[core.Message]) -> None:
        js = self.js
        futures = []
        deadline = self.s.ack_timeout
        for m in messages:
            fut = await js.publish_async(m.subject, m.payload, wait_stall=deadline, headers={"Nats-Msg-Id": m.msg_id})
            futures.append((m, fut))
            self.stats["sent"] += 1
        pending = {fut for _, fut in futures}
        while pending:
            done, pending = await asyncio.wait(pending, timeout=deadline)
            if not done:
                for fut in pending:
                    fut.cancel()
                raise TimeoutError(f"{len(pending)} acks missing after {deadline:g} s")
        for m, fut in futures:
            ack = fut.result()  # raises the broker's error for a refused message
            self.stats["acked"] += 1
            self.stats["acked_readings"] += m.readings
            if ack.duplicate:
                self.stats["duplicates"] += 1

    # ------------------------------------------------------------ status

    def status(self) -> dict:
        entries, readings, oldest = self.source.pending(self.cursor) if self.source else (0, 0, None)
        now = time.time()
        return dict(
            pid=os.getpid(),
            started=self.started,
            updated=now,
            gateway=self.s.gateway,
            position=self.cursor,
            position_written=self.written,
            position_writes=self.position_writes,
            reads=self.reads,
            pending_entries=entries,
            pending_readings=readings,
            oldest_unsent_age=None if oldest is None else max(0.0, now - oldest),
            connected=self.connected_to if self.nc is not None else None,
            last_ack=self.last_ack,
            last_error=self.last_error,
            **self.stats,
        )

    def status_line(self) -> str:
        st = self.status()
        age = "-" if st["oldest_unsent_age"] is None else f"{st['oldest_unsent_age']:.1f} s"
        return (
            f"status: sent {st['sent']}, acked {st['acked']} messages ({st['acked_readings']} readings, "
            f"{st['duplicates']} duplicates dropped by the broker); pending {st['pending_readings']} readings "
            f"in {st['pending_entries']} entries, oldest unsent {age}; reconnects {st['reconnects']}; "
            f"{'connected to ' + st['connected'] if st['connected'] else 'NOT connected'}"
        )

    def _write_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_status_file < 1.0:
            self._status_stale = True  # the loop writes it once the second has passed
            return
        self._last_status_file = now
        self._status_stale = False
        self.notify(f"STATUS={self.status_line()[8:]}")
        try:
            source.write_atomically(status_path(self.s.db), json.dumps(self.status()).encode() + b"\n", durable=False)
        except (OSError, Exception) as exc:  # status is advisory; never stop forwarding for it
            log.debug("cannot write %s: %s", status_path(self.s.db), exc)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.s.status_interval)
            line = self.status_line()
            log.info("%s", line)
            self.notify(f"STATUS={line[8:]}")
            self._write_status(force=True)
