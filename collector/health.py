"""Sensor health: each sensor's own send interval, staleness and clock offset.  No I/O.

Pure: the collector hands in one sample per sensor per flush (the sensor's
stream, its highest seq, when its last datagram was received and the `ts` it
carried), and this module keeps just enough to answer three questions:

- **interval**: how often does the sensor send?  Each sample against the one
  before gives (delta received) / (delta seq).  Seqs lost on the way still
  count in delta seq, so loss does not stretch the estimate; the median of the
  last `INTERVAL_SAMPLES` such ratios ignores the odd reordered or delayed
  datagram.  A new stream (restart, boot change) starts a new baseline.
- **stale**: silent for longer than `max(factor x interval, floor)`
  (`stale_after`), the threshold Prometheus users know as "absent for N
  scrape intervals".  Until an interval has been learned a sensor is never
  called stale (one datagram says nothing about how often the next comes).
- **clock offset**: the sensor's `ts` minus our receive time.  Network and
  queueing delay only ever make that difference *smaller* (the datagram is
  received later than it was stamped), so the estimate is the largest
  difference seen recently (the minimum-delay sample, as NTP picks), over two
  alternating epochs of `OFFSET_EPOCH` samples, so a clock that was set right
  is believed within 2 x OFFSET_EPOCH samples.  A sensor whose offset is
  beyond the threshold is flagged (`clock_skewed`); its readings are kept.

Time is a parameter everywhere: nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

INTERVAL_SAMPLES = 7  # ratios kept per sensor for the median (odd: a true middle)
OFFSET_EPOCH = 8  # offset samples per epoch; the estimate spans the current and the last epoch

DEFAULT_STALE_FACTOR = 3.0
DEFAULT_STALE_FLOOR_S = 10.0
DEFAULT_CLOCK_THRESHOLD_S = 2.0


@dataclass(frozen=True)
class HealthPolicy:
    """What counts as stale and as a clock that is off (from the collector's settings)."""

    stale_factor: float = DEFAULT_STALE_FACTOR  # silent for more than this many intervals ...
    stale_floor: float = DEFAULT_STALE_FLOOR_S  # ... and at least this many seconds
    clock_threshold: float = DEFAULT_CLOCK_THRESHOLD_S  # |clock offset| beyond this is flagged

    def __post_init__(self) -> None:
        for name in ("stale_factor", "stale_floor", "clock_threshold"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    def stale_after(self, interval: float | None) -> float | None:
        """Seconds of silence after which a sensor with this interval is stale (None: not learned)."""
        if interval is None:
            return None
        return max(self.stale_factor * interval, self.stale_floor)

    def skewed(self, offset: float | None) -> bool:
        return offset is not None and abs(offset) > self.clock_threshold


def is_stale(last_seen: float, stale_after: float | None, now: float) -> bool:
    """The one staleness rule, shared by the collector's metrics and the query server."""
    return stale_after is not None and now - last_seen > stale_after


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class SensorHealth:
    """The health state of one sensor; fed by `sample`, read through the properties."""

    __slots__ = ("stream", "seq", "received", "ratios", "learned", "offset_now", "offset_before", "offset_n")

    def __init__(self, learned: float | None = None) -> None:
        self.stream: object = None  # baseline of the next ratio: stream, highest seq, received
        self.seq = 0
        self.received = 0.0
        self.ratios: list[float] = []
        self.learned = learned  # an interval known from before (the database), until ratios exist
        self.offset_now: float | None = None  # max(ts - received) in the current epoch
        self.offset_before: float | None = None  # ... and in the epoch before it
        self.offset_n = 0  # samples in the current epoch

    def sample(self, stream: object, seq: int, received: float, ts: float | None) -> None:
        """One observation: the sensor's stream and highest (unwrapped) seq, the
        receive time of its last datagram, and that datagram's ts (None: it sent none)."""
        if stream == self.stream and seq > self.seq and received > self.received:
            ratio = (received - self.received) / (seq - self.seq)
            if ratio > 0:  # a subnormal time step divided by a seq step can underflow to 0.0
                ratios = self.ratios
                ratios.append(ratio)
                if len(ratios) > INTERVAL_SAMPLES:
                    del ratios[0]
        if stream != self.stream or seq > self.seq:
            # A duplicate or a late datagram moves neither the seq nor the
            # baseline: the next ratio is taken against the last real advance.
            self.stream, self.seq, self.received = stream, seq, received
        if ts is not None:
            offset = ts - received
            if self.offset_now is None or offset > self.offset_now:
                self.offset_now = offset
            self.offset_n += 1
            if self.offset_n >= OFFSET_EPOCH:
                self.offset_before, self.offset_now, self.offset_n = self.offset_now, None, 0

    @property
    def interval(self) -> float | None:
        """Learned send interval in seconds (None until one ratio exists and nothing was known)."""
        return _median(self.ratios) if self.ratios else self.learned

    @property
    def clock_offset(self) -> float | None:
        """Sensor clock minus ours, in seconds (positive: the sensor is ahead)."""
        now, before = self.offset_now, self.offset_before
        if now is None:
            return before
        return now if before is None else max(now, before)


class HealthBook:
    """Health of every sensor, by sensor id; what the collector keeps and persists."""

    def __init__(self, policy: HealthPolicy = HealthPolicy()) -> None:
        self.policy = policy
        self.sensors: dict[str, SensorHealth] = {}
        # The row last handed out for storage, per sensor: an unchanged row is
        # not written again (rows are rounded so that jitter does not count).
        self.written: dict[str, tuple] = {}

    def prime(self, sensor: str, interval: float | None, clock_offset: float | None) -> None:
        """What the database remembers of a sensor from an earlier run."""
        health = self.sensors[sensor] = SensorHealth(interval)
        health.offset_before = clock_offset
        self.written[sensor] = self.row(sensor)

    def sample(self, sensor: str, stream: object, seq: int, received: float, ts: float | None) -> SensorHealth:
        health = self.sensors.get(sensor)
        if health is None:
            health = self.sensors[sensor] = SensorHealth()
        health.sample(stream, seq, received, ts)
        return health

    def sample_states(self, states: Iterable) -> None:
        """One sample from each sensor touched since the last flush (store.SensorState:
        its tracker's stream and highest seq, last_seen, last_ts)."""
        sample = self.sample
        for state in states:
            tracker = state.tracker
            sample(state.sensor, tracker.stream, tracker.position, state.last_seen, state.last_ts)

    def row(self, sensor: str) -> tuple[float | None, float | None, float | None, int | None]:
        """(interval, stale_after, clock_offset, clock_skewed) as stored in the sensors table:
        the interval to 4 significant digits, the offset to the millisecond."""
        health = self.sensors.get(sensor)
        if health is None:
            return (None, None, None, None)
        interval, offset = health.interval, health.clock_offset
        if interval is not None:
            interval = float(f"{interval:.4g}")
        if offset is not None:
            offset = round(offset, 3)
        return (
            interval,
            self.policy.stale_after(interval),
            offset,
            None if offset is None else int(self.policy.skewed(offset)),
        )

    def changed_rows(self, sensors: Iterable[str]) -> list[tuple]:
        """(*row, sensor) for each sensor whose row differs from the one last handed out."""
        out = []
        written = self.written
        for sensor in sensors:
            row = self.row(sensor)
            if written.get(sensor) != row:
                written[sensor] = row
                out.append((*row, sensor))
        return out

    def forget_written(self) -> None:
        """The database refused the flush that carried the last rows: hand them all out again."""
        self.written.clear()

    def count(self, last_seen: Mapping[str, float], now: float) -> tuple[int, int]:
        """(stale, clock_skewed) among the sensors in `last_seen` (sensor -> last receive time)."""
        stale = skewed = 0
        sensors = self.sensors
        policy = self.policy
        for sensor, seen in last_seen.items():
            health = sensors.get(sensor)
            if health is None:
                continue
            if is_stale(seen, policy.stale_after(health.interval), now):
                stale += 1
            if policy.skewed(health.clock_offset):
                skewed += 1
        return stale, skewed

    def stale(self, last_seen: Mapping[str, float], now: float) -> Iterable[str]:
        policy = self.policy
        for sensor, seen in last_seen.items():
            health = self.sensors.get(sensor)
            if health is not None and is_stale(seen, policy.stale_after(health.interval), now):
                yield sensor
