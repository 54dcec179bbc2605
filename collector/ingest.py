"""The ingest core: bytes in, accounts and what to store out. No sockets, no SQLite.

h11-style (docs/STYLE practice 1): `IngestCore.receive(data, now)` takes one
datagram's bytes and the receive time and does everything the collector
decides about it: first-byte dispatch (plain or signed), decode, tag and
replay window, the cardinality guards, the sensor registry, metric-name
interning, sequence tracking, and queueing what is to be stored
(`receive_many(datas, now)` does the same for a burst, with the common case
inline: the collector's loop calls it).  It returns
the tracker's event (collector/sequence.py: `InOrder`, `Gap`, ..., `Duplicate`)
when the datagram was accounted, or an outcome the caller may log
(`Rejected`, `Refused`, `Failed`, in REPORTED); everything is counted here.  The store only writes what `batch()` hands it
(`take()`: datagrams go on arriving while a writer thread writes it); the Collector only
owns sockets, signals, the loop and the rate-limited log.

The pending batch is kept in columns, one `_Pending` per (sensor, boot) in
order of first arrival (what a flush writes as ingest-log groups, so the
flush does not regroup a list of tuples: bench/ingest_core.py), plus the
arrival order itself (one list of group references: "oldest first" is the
order `trim` drops datagrams in when the database refuses writes for too long).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import Any

import msgspec

from . import auth, tuning, wire
from .errors import DecodeError
from .ingestlog import Group
from .replay import ReplayWindow
from .sequence import IN_ORDER as _IN_ORDER
from .sequence import Duplicate, GapRecord, SensorTracker, Stray
from .wire import decode

# Counters every database has from the first flush on, so readers need no defaults.
COUNTERS = (
    "received",
    "stored",
    "stored_readings",
    "duplicates",
    "kernel_drops",
    "truncated",
    "storage_dropped",
    "refused_sensors",
    "refused_readings",
    "retention_dropped",
    "budget_dropped",
    "uplink_dropped",
    "corrupt_chunks",
)


STRAYS_REMEMBERED = 64  # per sensor

# The tracker and replay-window snapshots as JSON text: the same text as
# json.dumps(..., separators=(",", ":")) gives for them (ints, None, ASCII
# strings; tests/test_ingest.py compares), ~10x cheaper: json.dumps with
# separators builds a JSONEncoder per call, 6.6 of a row's 7.9 us, once per
# sensor and flush (bench/ingest_core.py --readings 5).
_json = msgspec.json.Encoder().encode


class SensorState:
    """What the collector keeps per sensor between datagrams."""

    __slots__ = (
        "sensor",
        "tracker",
        "series",
        "first_seen",
        "last_seen",
        "readings",
        "replay",
        "strays",
        "last_ts",
        "pending",
        "names",
    )

    def __init__(
        self,
        sensor: str,
        tracker: SensorTracker,
        series: dict[str, int],
        first_seen: float,
        last_seen: float,
        readings: int = 0,
        replay: ReplayWindow | None = None,
    ) -> None:
        self.sensor = sensor
        self.tracker = tracker
        self.series = series  # metric -> series id
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.readings = readings
        # The anti-replay window of signed datagrams; None until the first one.
        self.replay = replay
        # (boot, seq, ts) of recent Strays: the tracker stores a far-off seq
        # each time it comes, so an exact repeat is recognised here (v2's
        # primary key ignored it; bounded, forgotten on restart).
        self.strays: set[tuple] | None = None
        self.last_ts: float | None = None  # ts of the last datagram (sensor clock), for collector/health.py
        self.pending: _Pending | None = None  # its datagrams of the current boot waiting for the flush
        # Metric names checked valid and interned: what the ingest core's
        # inline path trusts (IngestCore.receive_many); None until it checks.
        self.names: set[str] | None = None

    def row(self) -> tuple:
        """The sensors table's row (store.UPSERT_SENSOR), written at every flush that saw the sensor."""
        t = self.tracker
        snapshot = _json(t.snapshot()).decode()
        window = None if self.replay is None else _json(self.replay.snapshot()).decode()
        return (
            self.sensor,
            self.first_seen,
            self.last_seen,
            t.datagrams,
            self.readings,
            t.lost,
            t.duplicates,
            t.reordered,
            t.restarts,
            snapshot,
            window,
        )


# --- outcomes (None means accepted or duplicate) -------------------------------------------


@dataclass(frozen=True, slots=True)
class Rejected:
    """The datagram was refused; counted in `rejected:<reason>`."""

    error: DecodeError

    @property
    def reason(self) -> str:
        return self.error.reason


@dataclass(frozen=True, slots=True)
class Refused:
    """A cardinality guard kept something out; counted in `counter`.  When only
    some readings were refused, `event` is the datagram's tracker event."""

    what: str
    counter: str
    event: object = None


@dataclass(frozen=True, slots=True)
class Failed:
    """A bug cost this datagram (counted in internal_errors); the caller logs `error`."""

    error: BaseException


REPORTED = frozenset((Rejected, Refused, Failed))  # outcome classes the caller logs


def _one_value(name: str) -> Any:
    """readings -> (readings[name],): KeyError when the one name is another."""
    get = itemgetter(name)
    return lambda readings: (get(readings),)


class _Pending:
    """One (sensor, boot)'s datagrams waiting for the flush, in columns (arrival order).

    Readings are kept flat: while every datagram carries the group's metric
    names (those of its first datagram, in any order), their values go into
    one list, `width` per datagram in the order of `names`, and the readings
    dict is dropped at once; the flush slices the columns out of it.  A dict
    per datagram kept until the flush cost ~1 us per datagram more there
    (transposing and freeing 10,000 scattered dicts; bench/ingest_core.py).
    From the first datagram with other names on, the group keeps dicts
    (`rest`), as every datagram did before.
    """

    __slots__ = ("sensor", "boot", "seqs", "ts", "received", "state", "names", "width", "pick", "values", "rest")

    def __init__(self, sensor: str, boot: int | None, state: SensorState) -> None:
        self.sensor = sensor
        self.boot = boot
        self.seqs: list[int] = []
        self.ts: list[float] = []
        self.received: list[float] = []
        self.state = state
        self.names: tuple[str, ...] = ()
        self.width = -1  # no datagram yet; 0: the flat part is over (or never began)
        self.pick: Any = None  # readings dict -> its values in `names` order (an iterable)
        self.values: list[int | float] = []  # `width` per datagram of the flat part
        self.rest: list[dict[str, int | float]] | None = None  # dicts from the first irregular datagram on

    def add(self, readings: dict[str, int | float]) -> None:
        """Queue one datagram's readings (after its seq, ts and received)."""
        width = self.width
        if width > 0 and len(readings) == width:
            try:
                self.values.extend(self.pick(readings))
                return
            except KeyError:
                pass
        elif width < 0 and readings:
            names = self.names = tuple(readings)
            self.width = len(names)
            # itemgetter of several names gives a tuple (KeyError for one that is
            # missing); of one name it gives the value itself, so that one is wrapped.
            self.pick = _one_value(names[0]) if len(names) == 1 else itemgetter(*names)
            self.values.extend(self.pick(readings))
            return
        if self.rest is None:
            self.rest = []
        self.width = 0
        self.rest.append(readings)

    @property
    def flat_count(self) -> int:
        """Datagrams in the flat part."""
        return len(self.values) // len(self.names) if self.names else 0

    def reading(self, i: int) -> dict[str, int | float]:
        """Datagram i's readings (tests, tools, trim)."""
        flat = self.flat_count
        if i < flat:
            k = len(self.names)
            return dict(zip(self.names, self.values[i * k : i * k + k]))
        assert self.rest is not None
        return self.rest[i - flat]

    def drop_front(self, n: int) -> None:
        """Forget the oldest n datagrams (trim)."""
        del self.seqs[:n], self.ts[:n], self.received[:n]
        flat = self.flat_count
        del self.values[: min(n, flat) * len(self.names)]
        if n > flat and self.rest is not None:
            del self.rest[: n - flat]

    def group(self) -> Any:
        """The ingest-log group (collector/ingestlog.py): metric columns aligned with seqs,
        None where a datagram lacked the metric (as `group_batch` makes them)."""
        return self._group(list(self.seqs), list(self.ts), list(self.received))

    def hand_over(self) -> tuple[Any, list[int | float], list[dict[str, int | float]] | None]:
        """`group()` on this group's own lists (no copy), which it gives up for empty ones: the
        datagrams queued from now on go there, in the same layout (names, width).  Returns
        (the group, the flat values, the dicts) for `take_back`."""
        values, rest = self.values, self.rest
        g = self._group(self.seqs, self.ts, self.received)
        self.seqs, self.ts, self.received, self.values, self.rest = [], [], [], [], None
        return g, values, rest

    def take_back(self, group: Any, values: list[int | float], rest: list[dict[str, int | float]] | None) -> None:
        """Put a `hand_over`'s datagrams back in front of those queued since.  The flat part
        stays in front of the dicts: a group that kept dicts (width 0) when it handed over
        queued only dicts since."""
        self.seqs[:0] = group.seqs
        self.ts[:0] = group.ts
        self.received[:0] = group.received
        self.values[:0] = values
        if rest:
            self.rest = rest + (self.rest or [])

    def _group(self, seqs: list[int], ts: list[float], received: list[float]) -> Any:
        k = len(self.names)
        values = self.values
        # (No flat datagram left after a trim: its names are no column.)
        metrics: dict[str, list[Any]] = {name: values[i::k] for i, name in enumerate(self.names)} if values else {}
        rest = self.rest
        if rest:
            flat = self.flat_count
            for r in rest:
                for name in r:
                    if name not in metrics:
                        metrics[name] = [None] * flat
            metrics = {name: col + [r.get(name) for r in rest] for name, col in metrics.items()}
        return Group(self.sensor, self.boot, seqs, ts, received, metrics)


@dataclass
class Batch:
    """What one flush writes, as the core stood at `batch()` or `take()`: after a
    `take()` the core goes on queueing datagrams (the collector's loop reads on
    while its writer thread writes this), forgets this batch's part once
    `committed()`, or takes it back, with its sensors, series and gaps, on `refused()`."""

    groups: list[Any]  # ingestlog.Group per (sensor, boot), in order of first arrival
    count: int  # datagrams
    readings: int
    dirty: list[SensorState]
    new_series: list[tuple[int, str, str]]
    gaps: dict[tuple[str, int, int], GapRecord | None]
    counters: dict[str, float]  # a copy, as they stood
    arrivals: list[_Pending] = field(repr=False, default_factory=list)
    sensor_rows: list[tuple] = field(repr=False, default_factory=list)  # SensorState.row() of `dirty`, as they stood
    # batch(): (group, its datagrams taken); take(): (group, its hand_over()) per group
    taken: list[tuple] = field(repr=False, default_factory=list)
    detached: bool = False  # by `take()`: its datagrams, sensors, series and gaps left the core with it

    @property
    def datagrams(self) -> list[tuple]:
        """(sensor, boot or None, seq, ts, received, readings) in arrival order (tests, tools)."""
        if not self.detached:
            return _in_arrival_order(self.arrivals)
        handed = {id(p): g for p, (g, _, _) in self.taken}
        at: dict[int, int] = {}
        out = []
        for p in self.arrivals:
            g = handed[id(p)]
            i = at.get(id(p), 0)
            at[id(p)] = i + 1
            readings = {name: col[i] for name, col in g.metrics.items() if col[i] is not None}
            out.append((g.sensor, g.boot, g.seqs[i], g.ts[i], g.received[i], readings))
        return out


def _in_arrival_order(arrivals: list[_Pending]) -> list[tuple]:
    at: dict[int, int] = {}
    out = []
    for g in arrivals:
        i = at.get(id(g), 0)
        at[id(g)] = i + 1
        out.append((g.sensor, g.boot, g.seqs[i], g.ts[i], g.received[i], g.reading(i)))
    return out


class IngestCore:
    """The per-datagram pipeline and the state it keeps (registry, trackers, batch)."""

    def __init__(
        self,
        *,
        counters: dict[str, float] | None = None,
        sensors: dict[str, SensorState] | None = None,
        next_series_id: int = 1,
        keyring: dict[str, bytes] | None = None,
        require_auth: bool = False,
        max_sensors: int = tuning.MAX_SENSORS,
        max_series_per_sensor: int = tuning.MAX_SERIES_PER_SENSOR,
    ) -> None:
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        if counters:
            self.counters.update(counters)
        self.counters.setdefault("internal_errors", 0)
        self.sensors: dict[str, SensorState] = sensors if sensors is not None else {}
        self.require_auth = require_auth
        self.max_sensors = max_sensors
        self.max_series_per_sensor = max_series_per_sensor
        self.keyring: dict[str, bytes] = {}
        self.keyed: frozenset[str] = frozenset()
        self.set_keys(keyring or {})
        self._next_series_id = next_series_id
        self._groups: dict[tuple[str, int | None], _Pending] = {}
        self._arrivals: list[_Pending] = []  # one entry per pending datagram, oldest first
        self.pending_readings = 0
        self.repeated_strays = 0  # exact repeats of a Stray not queued again (this run)
        self.dirty: set[SensorState] = set()
        self._new_series: list[tuple[int, str, str]] = []
        self._gaps: dict[tuple[str, int, int], GapRecord | None] = {}

    @property
    def pending_datagrams(self) -> int:
        return len(self._arrivals)

    @property
    def pending(self) -> list[tuple]:
        """The pending datagrams as (sensor, boot, seq, ts, received, readings), oldest first
        (for tests and tools: the flush reads the columns)."""
        return _in_arrival_order(self._arrivals)

    def discard_pending(self) -> None:
        """Forget the unflushed batch, as a crash would (tests)."""
        for g in self._groups.values():
            g.state.pending = None
        self._groups = {}
        self._arrivals = []
        self.pending_readings = 0

    def set_keys(self, keys: dict[str, bytes]) -> None:
        """Swap the key set in whole (a reload)."""
        self.keyring = keys
        self.keyed = frozenset(key_id.partition("@")[0] for key_id in keys)
        # The sensors whose plain datagrams may take receive_many's inline
        # path: valid ids (a database is not trusted for that) without a key.
        plain = {}
        for sensor, state in self.sensors.items():
            if sensor not in self.keyed and wire.is_valid_id(sensor):
                if state.names is None:
                    state.names = {name for name in state.series if wire.is_valid_name(name)}
                plain[sensor] = state
        self._plain = plain

    # --- the hot path ----------------------------------------------------------------------

    def receive(self, data: bytes, now: float):
        """Account one datagram received at `now`: its tracker event, or an outcome in REPORTED."""
        try:
            # The first byte tells the forms apart (docs/PROTOCOL.md); plain
            # datagrams pay this test, the require_auth test and one set lookup.
            if not data or data[0] != 0x93:
                if self.require_auth:
                    raise auth.refuse_plain(data)  # too_large before not_signed
                sensor, seq, boot, ts, readings = decode(data)
                if sensor in self.keyed:
                    raise DecodeError("not_signed", f"sensor {sensor!r} has a key: its datagrams must be signed")
                state = self.sensors.get(sensor)
                if state is None:
                    state = self.new_sensor(sensor, now)
                    if state is None:
                        return self._refused_sensor(sensor)
            else:
                (sensor, seq, boot, ts, readings), state = self._verify(data, now)
                if state is None:
                    return self._refused_sensor(sensor)
            event = state.tracker.observe(boot, seq, now)
            state.last_seen = now
            state.last_ts = ts  # the sensor's clock, for its clock offset (collector/health.py)
            self.dirty.add(state)
            if event.__class__ is Duplicate:
                self.counters["duplicates"] += 1
                return event
            if ts is None:
                ts = now
            if event.__class__ is Stray and self._repeated_stray(state, boot, seq, ts):
                self.repeated_strays += 1
                self.counters["duplicates"] += 1  # not stored again: the collector's duplicate count
                return event  # the sensor's accounts stay as the tracker says
            series = state.series
            outcome = event
            if not series.keys() >= readings.keys():  # a metric name seen for the first time
                refused = None
                for name in readings:
                    if name not in series and not self._intern(state, name):
                        if refused is None:
                            refused = dict(readings)
                        del refused[name]
                if refused is not None:
                    self.counters["refused_readings"] += len(readings) - len(refused)
                    outcome = Refused(
                        f"reading {', '.join(name for name in readings if name not in refused)} of "
                        f"sensor {sensor}: it has {len(series)} metrics already "
                        f"(MAX_SERIES_PER_SENSOR)",
                        "refused_readings",
                        event,
                    )
                    readings = refused
            g = state.pending
            if g is None or g.boot != boot:
                g = self._pending_group(state, boot)
            g.seqs.append(seq)
            g.ts.append(ts)
            g.received.append(now)
            g.add(readings)
            self._arrivals.append(g)
            n = len(readings)
            self.pending_readings += n
            state.readings += n
            return outcome
        except DecodeError as exc:
            key = "rejected:" + exc.reason
            self.counters[key] = self.counters.get(key, 0) + 1
            return Rejected(exc)
        except Exception as exc:  # a bug must cost one datagram, never the loop
            self.counters["internal_errors"] += 1
            return Failed(exc)

    def receive_many(self, datas: list, now: float) -> list[tuple[int, Any]]:
        """Account a burst of datagrams received at `now`, in order; returns
        (index, outcome) for the outcomes in REPORTED, the caller's to log.

        The same accounts as `receive` per datagram (tests/test_ingest.py
        compares them on random bursts), one call per burst: the common case
        (a plain datagram of the fast decoder's shape from a known sensor with
        known metrics) runs inline with the loop's state in locals, and every
        other datagram goes through `receive` before the state is touched.
        bench/ingest_core.py measures it.
        """
        reported: list[tuple[int, Any]] = []
        fast = wire.fast_decode
        d: Any  # the fast decoder's Struct, or None: the careful path
        state: Any  # a SensorState whenever d is not None
        tracker: Any
        cur: Any
        g: Any
        vals: Any  # the datagram's values in its pending group's order, when it has that group's names
        if fast is None or self.require_auth:
            for i, data in enumerate(datas):
                outcome = self.receive(data, now)
                if outcome.__class__ in REPORTED:
                    reported.append((i, outcome))
            return reported
        receive = self.receive
        plain = self._plain.get
        max_bytes = wire.MAX_DATAGRAM_BYTES
        dirty_add = self.dirty.add
        arrive = self._arrivals.append
        counters = self.counters
        readings_added = 0
        i = -1
        for data in datas:
            i += 1
            try:
                if len(data) <= max_bytes:
                    try:
                        d = fast(data)
                    except Exception:  # noqa: BLE001 - the careful path judges it
                        d = None
                    else:
                        # `decode` trusts the fast decoder for a valid id and
                        # valid names; these are a known sensor without a key
                        # and known metric names, all checked valid: the common
                        # case of `receive`, which takes every other datagram.
                        state = plain(d.id)
                        if state is None:
                            d = None
                        else:
                            r = d.r
                            n = len(r)
                            # Exactly the names of the sensor's pending group of this
                            # boot (known and valid since its first datagram): its
                            # values in the group's order, and no other check.
                            g = state.pending
                            vals = None
                            if g is not None and g.width == n and g.boot == d.boot:
                                try:
                                    vals = g.pick(r)
                                except KeyError:
                                    pass
                            if vals is None and not state.names.issuperset(r):
                                d = None
                else:
                    d = None
                if d is not None:
                    boot = d.boot
                    seq = d.seq
                    ts = d.ts
                    tracker = state.tracker
                    cur = tracker._cur
                    state.last_seen = now
                    state.last_ts = ts
                    dirty_add(state)
                    if boot == cur.boot and (seq - cur.max) & 0xFFFFFFFF == 1:
                        # SensorTracker.observe's in-order case, inline (one call less a datagram)
                        cur.max += 1
                        tracker.datagrams += 1
                    else:
                        event = tracker.observe(boot, seq, now)
                        if event is _IN_ORDER:
                            pass
                        elif event.__class__ is Duplicate:
                            counters["duplicates"] += 1
                            continue
                        else:
                            if ts is None:
                                ts = now
                            if event.__class__ is Stray and self._repeated_stray(state, boot, seq, ts):
                                self.repeated_strays += 1
                                counters["duplicates"] += 1
                                continue
                    if vals is None:
                        g = state.pending
                        if g is None or g.boot != boot:
                            g = self._pending_group(state, boot)
                    g.seqs.append(seq)
                    g.ts.append(now if ts is None else ts)
                    g.received.append(now)
                    if vals is not None:
                        g.values.extend(vals)
                    elif g.width == n:
                        try:
                            g.values.extend(g.pick(r))
                        except KeyError:  # other names: the group keeps dicts from here on
                            g.add(r)
                    else:
                        g.add(r)
                    arrive(g)
                    readings_added += n
                    state.readings += n
                    continue
            except Exception as exc:  # a bug must cost one datagram, never the loop
                counters["internal_errors"] += 1
                reported.append((i, Failed(exc)))
                continue
            outcome = receive(data, now)
            if outcome.__class__ in REPORTED:
                reported.append((i, outcome))
        self.pending_readings += readings_added
        return reported

    def _pending_group(self, state: SensorState, boot: int | None) -> _Pending:
        key = (state.sensor, boot)
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = _Pending(state.sensor, boot, state)
        state.pending = g
        return g

    @staticmethod
    def _repeated_stray(state: SensorState, boot, seq: int, ts: float) -> bool:
        strays = state.strays
        if strays is None:
            strays = state.strays = set()
        key = (boot, seq, ts)
        if key in strays:
            return True
        if len(strays) >= STRAYS_REMEMBERED:
            strays.clear()
        strays.add(key)
        return False

    def _verify(self, data: bytes, now: float):
        """A signed datagram: authenticate, decode, then the replay window.

        The window moves only here, after the tag verified and the body
        decoded (RFC 4303 3.4.3).  The state is None when MAX_SENSORS refuses
        a new sensor.
        """
        datagram, _ = auth.decode_signed(data, self.keyring)
        state = self.sensors.get(datagram.sensor) or self.new_sensor(datagram.sensor, now)
        if state is None:
            return datagram, None
        window = state.replay
        if window is None:
            window = state.replay = ReplayWindow()
        boot, seq = datagram.boot, datagram.seq
        assert boot is not None  # decode_signed refuses a signed datagram without boot (bad_boot)
        if not window.check(boot, seq):
            raise DecodeError(
                "replayed",
                f"sensor {datagram.sensor!r} boot {boot} seq {seq} was accepted "
                f"before, or is older than the replay window",
            )
        window.accept(boot, seq)
        return datagram, state

    def _refused_sensor(self, sensor: str) -> Refused:
        self.counters["refused_sensors"] += 1
        return Refused(
            f"datagrams from new sensor {sensor}: {len(self.sensors)} sensors are tracked already (MAX_SENSORS)",
            "refused_sensors",
        )

    def new_sensor(self, sensor: str, now: float) -> SensorState | None:
        """Start tracking a sensor; None when max_sensors are tracked already."""
        if len(self.sensors) >= self.max_sensors:
            return None
        state = SensorState(sensor, SensorTracker(), {}, now, now)
        state.names = set()
        self.sensors[sensor] = state
        if sensor not in self.keyed:  # its id was checked by the decoder
            self._plain[sensor] = state
        return state

    def _intern(self, state: SensorState, metric: str) -> bool:
        if len(state.series) >= self.max_series_per_sensor:
            return False
        series_id = self._next_series_id
        self._next_series_id += 1
        state.series[metric] = series_id
        if state.names is not None:  # the decoder checked the name
            state.names.add(metric)
        self._new_series.append((series_id, state.sensor, metric))
        return True

    # --- the batch -----------------------------------------------------------------------

    def batch(self) -> Batch:
        """Everything the next flush must write, as it stands now (a snapshot; the
        core keeps it all until `committed()`: tests and tools look with this)."""
        groups = self._groups.values()
        return self._batch(
            [g.group() for g in groups], self._arrivals[:], [(g, len(g.seqs)) for g in groups], detached=False
        )

    def take(self) -> Batch:
        """`batch()` for a flush that may be written in another thread while this core
        queues more: its datagrams, sensors, new series and gap changes leave the core
        with it (what arrives meanwhile goes to the next one).  The groups hand their
        lists over (`_Pending.hand_over`) instead of copying them, so `committed()` has
        nothing to cut out of them.  Hand it back with `committed()` or `refused()`
        before the next `take()`; `pending_readings` counts it until then."""
        taken = [(g, g.hand_over()) for g in self._groups.values()]
        batch = self._batch([handed[0] for _, handed in taken], self._arrivals, taken, detached=True)
        self._arrivals = []
        self.dirty = set()
        self._new_series = []
        self._gaps = {}
        return batch

    def _batch(self, groups: list, arrivals: list, taken: list, detached: bool) -> Batch:
        """The Batch of these groups and arrivals with the core's sensors, series, gap
        changes and counters as they stand (batch() and take())."""
        for state in self.dirty:
            merge_gap_changes(self._gaps, state.sensor, state.tracker.pop_gap_changes())
        dirty = list(self.dirty)
        return Batch(
            groups,
            len(arrivals),
            self.pending_readings,
            dirty,
            self._new_series,
            self._gaps,
            dict(self.counters),
            arrivals,
            [state.row() for state in dirty],
            taken,
            detached,
        )

    def committed(self, batch: Batch, now: float) -> None:
        """The store committed `batch`: account it and forget its datagrams (those
        queued since a `take()` stay pending, in order)."""
        self.counters["stored"] += batch.count
        self.counters["stored_readings"] += batch.readings
        self.counters["last_flush"] = now
        if batch.detached:  # its datagrams left with it: forget the groups nothing came to since
            for g, _ in batch.taken:
                if not g.seqs:
                    self._forget(g)
            self.pending_readings -= batch.readings
            return
        # batch(): its sensors, series and gaps never left (nothing can have come since:
        # the caller's promise); its datagrams are the oldest pending
        self.dirty = set()
        self._new_series = []
        self._gaps = {}
        if batch.count == len(self._arrivals):
            self.discard_pending()
            return
        for g, n in batch.taken:
            g.drop_front(n)
            if not g.seqs:
                self._forget(g)
        del self._arrivals[: batch.count]
        self.pending_readings -= batch.readings

    def _forget(self, g: _Pending) -> None:
        key = (g.sensor, g.boot)
        if self._groups.get(key) is g:
            del self._groups[key]
        if g.state.pending is g:
            g.state.pending = None

    def refused(self, batch: Batch) -> None:
        """The store refused `batch` (nothing of it was written): its datagrams go back in
        front of those queued since, and its sensors, new series and gap changes go back
        to the next batch."""
        if not batch.detached:
            return  # they never left
        for g, handed in batch.taken:
            g.take_back(*handed)
            assert self._groups.get((g.sensor, g.boot)) is g  # only committed() forgets a taken group
        self._arrivals[:0] = batch.arrivals
        self.dirty.update(batch.dirty)
        self._new_series = batch.new_series + self._new_series
        # No batch() since: every gap change popped after it is still in its tracker.
        assert not self._gaps
        self._gaps = batch.gaps

    def trim(self, max_readings: int) -> int:
        """Drop the oldest whole datagrams beyond `max_readings` queued; returns readings dropped."""
        excess = self.pending_readings - max_readings
        if excess <= 0:
            return 0
        # A tenth more than needed, so trimming is not an O(n) shift per burst.
        want = min(self.pending_readings, excess + max_readings // 10)
        dropped = n = 0
        drop: dict[int, int] = {}  # id(group) -> datagrams dropped from its front
        for g in self._arrivals:
            if dropped >= want:
                break
            i = drop.get(id(g), 0)
            dropped += len(g.reading(i))
            drop[id(g)] = i + 1
            n += 1
        del self._arrivals[:n]
        for key, g in list(self._groups.items()):
            k = drop.get(id(g), 0)
            if k:
                g.drop_front(k)
                if not g.seqs:
                    del self._groups[key]
                    if g.state.pending is g:
                        g.state.pending = None
        self.pending_readings -= dropped
        self.counters["storage_dropped"] += dropped
        return dropped

    def lost(self) -> int:
        return sum(state.tracker.lost for state in self.sensors.values())


def merge_gap_changes(
    pending: dict[tuple[str, int, int], GapRecord | None],
    sensor: str,
    changes: dict[tuple[int, int], GapRecord | None],
) -> None:
    """Add one tracker's popped gap changes to the unwritten ones of a sensor set.

    When a flush failed, `pending` still holds changes the database never
    saw: a piece whose origin row is one of them takes its time (or its
    origin) now, before that row's own change is replaced.
    """
    for (stream, first_seq), record in changes.items():
        if record is not None and record.detected_at is None and record.origin is not None:
            before = pending.get((sensor, stream, record.origin))
            if before is not None:
                changes[(stream, first_seq)] = replace(record, detected_at=before.detected_at, origin=before.origin)
    for (stream, first_seq), record in changes.items():
        pending[(sensor, stream, first_seq)] = record


def group_batch(datagrams: list[tuple]) -> list[Any]:
    """The batch's datagrams as ingest-log groups: one per (sensor, boot), arrival order kept.

    Metric columns are aligned with seqs, None where a datagram lacked the metric.
    """
    by_key: dict[tuple, list[tuple]] = {}
    for item in datagrams:
        key = (item[0], item[1])
        rows = by_key.get(key)
        if rows is None:
            by_key[key] = [item]
        else:
            rows.append(item)
    groups = []
    for (sensor, boot), rows in by_key.items():
        names: dict[str, None] = {}
        for row in rows:
            for name in row[5]:
                names[name] = None
        metrics = {name: [row[5].get(name) for row in rows] for name in names}
        groups.append(Group(sensor, boot, [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows], metrics))
    return groups
