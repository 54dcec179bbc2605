"""The simulator: one loop drives every sensor through time slots, sends, and keeps the ground truth.

Sensors share one schedule of equally spaced slots: slot k belongs to sensor
k mod N and is due at start + k / (N * rate).  That spreads the sensors
evenly over each period, keeps the aggregate rate exact (the next due time is
computed from k, never from "now + period", so delays do not accumulate), and
costs O(1) per datagram for any number of sensors: there is no thread or
timer per sensor.  When several slots are due at once (high rates, a late
wake-up) they are sent back to back.  With rate=None ("max") no slot waits.

`Engine` is shared with replay: it encodes each datagram with
`collector.wire.encode` (and, with `Signing`, wraps it with
`collector.auth.sign`), passes it through `Faults`, sends it with `Sender`,
and records the outcome in each sensor's `Truth`.  The report is built only
from what `Sender` says succeeded.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from collector.auth import key_allows, sign
from collector.errors import ConfigError, EncodeError, SetupError
from collector.wire import encode

from .faults import SEQ_MASK, FaultRates, Faults, Truth
from .net import Sender, Target
from .signals import DEFAULT_METRICS, SensorSignals

PROGRESS_EVERY_S = 5.0
MAX_SLEEP_S = 0.1  # bounds how late a stop request (Ctrl-C) is noticed
MAX_BATCH = 256  # slots sent between clock/stop checks (~3 ms at --rate max)
# With --rate and --duration, slots still due when the duration is up are sent
# late, for an exact count, but only this long: a rate beyond one core would
# otherwise turn --duration 60 into an hour.
LATE_GRACE_S = 1.0


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


class _NeverStop:
    def is_set(self) -> bool:
        return False


SENSOR_PLACEHOLDER = "{sensor}"


@dataclass(frozen=True)
class Signing:
    """How sensors sign (docs/PROTOCOL.md, "Signed datagrams").

    `key_id` is a template: "{sensor}" becomes each sensor's id, so one
    setting serves any number of sensors ("{sensor}@2026" for a rotated key).
    The key is `key` for every sensor, or each key id's own from `keys` (a
    key file as the collector reads it).
    """

    key_id: str = SENSOR_PLACEHOLDER
    key: bytes | None = None
    keys: dict[str, bytes] | None = None

    def __repr__(self) -> str:  # never show a key
        return f"Signing(key_id={self.key_id!r}, {'keys' if self.keys is not None else 'key'}=...)"

    def for_sensor(self, sensor_id: str) -> tuple[str, bytes]:
        """(key id, key) for one sensor, or ConfigError."""
        key_id = self.key_id.replace(SENSOR_PLACEHOLDER, sensor_id)
        if not key_allows(key_id, sensor_id):
            raise ConfigError(
                f"key id {key_id!r} cannot sign for sensor {sensor_id!r}: a key id is "
                f"the sensor id, optionally followed by @suffix (use {{sensor}} in "
                f"--key-id for several sensors)"
            )
        key = self.key if self.keys is None else self.keys.get(key_id)
        if key is None:
            raise ConfigError(f"no key {key_id!r} in the key file")
        try:
            sign(b"\x80", key_id, key)  # the key id's alphabet and the key's length
        except EncodeError as exc:
            raise ConfigError(str(exc)) from None
        return key_id, key


def check_signing(
    signing: Signing | None,
    ids: list[str],
    boots: list[int | None],
    start_seq: int,
    per_sensor: dict[str, int] | int | None,
) -> None:
    """ConfigError unless every sensor can sign and no seq would wrap under one boot.

    A signing sensor must never send a (boot, seq) twice, so seq may not wrap
    under one boot (docs/PROTOCOL.md).  The simulator refuses such a run
    rather than switching boot mid-run, which would make its report two
    streams per sensor.  `per_sensor`: datagrams per sensor when known.
    """
    if signing is None:
        return
    if any(b is None for b in boots):
        raise ConfigError("signed datagrams carry boot: drop --no-boot")
    for sid in ids:
        signing.for_sensor(sid)
    if per_sensor is None:
        return
    most = max(per_sensor.values()) if isinstance(per_sensor, dict) else per_sensor
    if start_seq + most > 1 << 32:
        raise ConfigError(
            f"--start-seq {start_seq} + {most} datagrams would wrap seq under one boot, "
            f"which signed datagrams must not (lower --start-seq)"
        )


@dataclass
class SimConfig:
    targets: list[Target]
    sensors: int = 1
    id_prefix: str = "sim"
    rate: float | None = 1.0  # per sensor, Hz; None means as fast as possible
    count: int | None = None  # per sensor
    duration: float | None = None  # seconds
    seed: int | None = None
    metrics: tuple[str, ...] = DEFAULT_METRICS
    boot: bool = True
    boot_value: int | None = None  # overrides the derived boot
    start_seq: int = 0
    ttl: int = 1
    multicast_interface: str | None = None
    faults: FaultRates = field(default_factory=FaultRates)
    signing: Signing | None = None

    def sensor_ids(self) -> list[str]:
        return [f"{self.id_prefix}-{i:04d}" for i in range(1, self.sensors + 1)]


def check_sensor_id(sensor_id: str) -> None:
    """ConfigError unless `sensor_id` is valid on the wire (1-64 of [A-Za-z0-9._:/-])."""
    try:
        encode(sensor_id, 0, {"x": 0})
    except EncodeError as exc:
        raise ConfigError(str(exc)) from None


def derive_seed(seed: int | None) -> int:
    """The seed to use: the given one, or a fresh one (reported so the run can be repeated)."""
    return seed if seed is not None else random.SystemRandom().getrandbits(63)


def derive_boots(n: int, *, enabled: bool, seed: int | None, value: int | None, now: float) -> list[int | None]:
    """Boot values for n sensors: none, a fixed value, one per sensor from the seed, or from time.

    From time, every sensor gets int(now): Unix seconds grow across restarts,
    as a device's boot counter would.
    """
    if not enabled:
        return [None] * n
    if value is not None:
        return [value & SEQ_MASK] * n
    if seed is not None:
        rng = random.Random(f"{seed}:boot")
        return [rng.getrandbits(32) for _ in range(n)]
    return [int(now) & SEQ_MASK] * n


class SimSensor:
    """One simulated sensor: identity, signal models, fault queue, ground truth."""

    __slots__ = ("id", "boot", "signals", "next_idx", "held", "truth", "key_id", "key")

    def __init__(
        self,
        sensor_id: str,
        boot: int | None,
        first_seq: int,
        signals: SensorSignals | None = None,
        signing: Signing | None = None,
    ) -> None:
        self.id = sensor_id
        self.boot = boot
        self.signals = signals
        self.next_idx = 0
        self.held: list[list[Any]] = []
        self.truth = Truth(boot, first_seq & SEQ_MASK)
        self.key_id, self.key = (None, None) if signing is None else signing.for_sensor(sensor_id)


class Engine:
    """Encode, inject faults, send, record: the part generated runs and replays share."""

    def __init__(self, sender: Sender, rates: FaultRates, seed: int) -> None:
        self.sender = sender
        self.faults = Faults(rates, random.Random(f"{seed}:faults")) if rates.any else None

    def generate(self, s: SimSensor, readings: dict[str, int | float], ts: float) -> None:
        truth = s.truth
        idx = s.next_idx
        s.next_idx = idx + 1
        truth.generated += 1
        seq = (truth.first_seq + idx) & SEQ_MASK
        data = encode(s.id, seq, readings, boot=s.boot, ts=ts)
        if s.key is not None:
            if idx and seq == 0:
                # Only an unbounded run gets here (check_signing refuses the
                # rest): 2**32 - start_seq datagrams of one sensor.
                raise SetupError(
                    f"{s.id}: seq would wrap under boot {s.boot}, which signed "
                    f"datagrams must not; restart with a new --boot-value"
                )
            data = sign(data, s.key_id, s.key)
        if self.faults is None:
            # Without faults, datagrams leave in idx order: nothing to reorder.
            if not self.sender.send(data):
                truth.send_failed.append(seq)
            return
        dropped, emissions = self.faults.admit(s.held, idx, data)
        if dropped:
            truth.dropped.append(seq)
        for e in emissions:
            self._send(s, e.idx, e.payload, e.copy)

    def _send(self, s: SimSensor, idx: int, payload: bytes, copy: bool) -> None:
        if self.sender.send(payload):
            s.truth.sent(idx, copy)
        else:
            s.truth.send_failed.append(s.truth.seq(idx))

    def drain(self, sensors: list[SimSensor]) -> None:
        """Send what fault injection still holds back, so the report covers every generated seq."""
        if self.faults is None:
            return
        for s in sensors:
            for e in self.faults.drain(s.held):
                self._send(s, e.idx, e.payload, e.copy)


def build_report(
    sender: Sender, sensors: list[SimSensor], *, seed: int, elapsed: float, interrupted: bool
) -> dict[str, Any]:
    sender.check_pending()
    return {
        "datagrams_sent": sender.sent,
        "send_failures": sender.failed,
        "send_errors": dict(sender.errors),
        "targets": sender.per_target(),
        "seed": seed,
        "elapsed_s": round(elapsed, 6),
        "interrupted": interrupted,
        "sensors": {s.id: s.truth.as_dict() for s in sensors},
    }


@dataclass
class Progress:
    """What a progress line shows; passed to the `progress` callback every PROGRESS_EVERY_S."""

    elapsed: float
    sent: int
    failed: int


def run(
    cfg: SimConfig,
    *,
    stop: StopFlag | None = None,
    progress: Callable[[Progress], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    sleep: Callable[[float], object] = time.sleep,
) -> dict[str, Any]:
    """Run the simulation until count, duration or `stop`; returns the report.

    `clock`, `wall` and `sleep` are the time it runs on; tests pass a fake
    clock whose `sleep` advances it, so pacing is checked without waiting.
    """
    stop = stop or _NeverStop()
    if cfg.sensors < 1:
        raise ConfigError("--sensors must be at least 1")
    ids = cfg.sensor_ids()
    check_sensor_id(ids[-1])  # the longest id
    seed = derive_seed(cfg.seed)
    boots = derive_boots(len(ids), enabled=cfg.boot, seed=cfg.seed, value=cfg.boot_value, now=wall())
    n = len(ids)
    interval = 1.0 / (n * cfg.rate) if cfg.rate else 0.0
    total = n * cfg.count if cfg.count is not None else None
    if total is None and cfg.duration is not None and interval:
        # A fixed rate and duration give an exact number of slots.
        total = max(1, math.floor(cfg.duration / interval + 1e-9))
    check_signing(cfg.signing, ids, boots, cfg.start_seq, None if total is None else -(-total // n))
    signal_rng = random.Random(f"{seed}:signals")
    t0 = wall()
    sensors = [
        SimSensor(sid, boot, cfg.start_seq, SensorSignals(cfg.metrics, signal_rng, t0), cfg.signing)
        for sid, boot in zip(ids, boots)
    ]
    deadline = math.inf
    if cfg.duration is not None:
        deadline = cfg.duration + (LATE_GRACE_S if interval else 0.0)

    sender = Sender(cfg.targets, cfg.ttl, cfg.multicast_interface)
    try:
        engine = Engine(sender, cfg.faults, seed)
        generate = engine.generate
        start = clock()
        next_progress = PROGRESS_EVERY_S
        k = 0
        interrupted = False
        while total is None or k < total:
            if stop.is_set():
                interrupted = True
                break
            now = clock() - start
            if now >= deadline:
                break
            if interval:
                due = int(now / interval) + 1
                if due <= k:
                    sleep(min(k * interval - now, MAX_SLEEP_S))
                    continue
                # Behind schedule (CPU-bound): catch up in bounded batches so
                # a stop request is still seen within milliseconds.
                due = min(due, k + MAX_BATCH)
            else:
                due = k + MAX_BATCH
            if total is not None and due > total:
                due = total
            for j in range(k, due):
                s = sensors[j % n]
                ts = wall()
                generate(s, s.signals.sample(ts), ts)
            k = due
            if progress is not None and now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                progress(Progress(now, sender.sent, sender.failed))
        engine.drain(sensors)
        elapsed = clock() - start
        return build_report(sender, sensors, seed=seed, elapsed=elapsed, interrupted=interrupted)
    finally:
        sender.close()
