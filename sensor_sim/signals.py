"""Signal models: what a simulated sensor measures, as a function of time.

Each model is built once per sensor from a seeded `random.Random` (so its
character — mean, amplitude, starting charge — is reproducible with --seed)
and then sampled with `sample(t)`, where `t` is Unix seconds passed in by the
caller: no model reads a clock.  Values are rounded to what a real device
would report, which also keeps datagrams small.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

DAY_S = 86400.0
_TWO_PI = 2.0 * math.pi

# Noise is Irwin-Hall: (u1 + u2 + u3 - 1.5) * 2 has mean 0 and standard
# deviation 1, bounded at +-3.  It looks Gaussian enough for sensor noise and
# costs 137 ns against 345 ns for random.gauss (pure Python; timeit, 3.11),
# which was 15 % of the simulator's profile at --rate max.


def _irwin_hall(random: Callable[[], float]) -> float:
    return (random() + random() + random() - 1.5) * 2.0


class Temperature:
    """Air temperature in °C: a daily cosine (warmest about 14:00 UTC) plus noise."""

    name = "temp"

    def __init__(self, rng: random.Random, t0: float) -> None:
        self.rng = rng
        self.random = rng.random
        self.mean = rng.uniform(14.0, 24.0)
        self.amplitude = rng.uniform(3.0, 8.0)
        self.noise = 0.15

    def sample(self, t: float) -> float:
        phase = _TWO_PI * ((t - 14 * 3600.0) % DAY_S) / DAY_S
        value = self.mean + self.amplitude * math.cos(phase) + self.noise * _irwin_hall(self.random)
        return round(value, 2)


class Humidity:
    """Relative humidity in %: the daily cycle in antiphase to temperature, clamped 0-100."""

    name = "hum"

    def __init__(self, rng: random.Random, t0: float) -> None:
        self.rng = rng
        self.random = rng.random
        self.mean = rng.uniform(40.0, 65.0)
        self.amplitude = rng.uniform(8.0, 15.0)

    def sample(self, t: float) -> float:
        phase = _TWO_PI * ((t - 2 * 3600.0) % DAY_S) / DAY_S
        value = self.mean + self.amplitude * math.cos(phase) + 0.5 * _irwin_hall(self.random)
        return round(min(100.0, max(0.0, value)), 1)


class Pressure:
    """Barometric pressure in hPa: a mean-reverting random walk around a site mean."""

    name = "pressure"

    def __init__(self, rng: random.Random, t0: float) -> None:
        self.rng = rng
        self.random = rng.random
        self.mean = rng.uniform(1005.0, 1022.0)
        self.value = self.mean + rng.gauss(0.0, 2.0)

    def sample(self, t: float) -> float:
        # The pull back to the mean (1 % per sample) keeps the walk in a
        # believable weather band however long the run is.
        self.value += 0.05 * _irwin_hall(self.random) - 0.01 * (self.value - self.mean)
        return round(self.value, 2)


class Battery:
    """Battery voltage in V: a linear discharge from a random charge, floored at 3.0 V."""

    name = "battery"

    def __init__(self, rng: random.Random, t0: float) -> None:
        self.rng = rng
        self.random = rng.random
        self.t0 = t0
        self.start = rng.uniform(3.7, 4.2)
        self.per_hour = rng.uniform(0.001, 0.01)

    def sample(self, t: float) -> float:
        hours = max(0.0, t - self.t0) / 3600.0
        value = self.start - self.per_hour * hours + 0.002 * _irwin_hall(self.random)
        return round(max(3.0, value), 3)


class Counter:
    """A pulse counter (an int): grows by 0-3 per sample, never decreases."""

    name = "counter"

    def __init__(self, rng: random.Random, t0: float) -> None:
        self.rng = rng
        self.random = rng.random
        self.value = rng.randrange(0, 1000)

    def sample(self, t: float) -> int:
        self.value += self.rng.randrange(0, 4)
        return self.value


MODELS: dict[str, Callable[[random.Random, float], object]] = {
    m.name: m for m in (Temperature, Humidity, Pressure, Battery, Counter)
}
DEFAULT_METRICS = ("temp", "hum", "battery")


def parse_metrics(text: str) -> tuple[str, ...]:
    """Parse a comma list such as 'temp,hum' (or 'all'); ValueError names an unknown metric."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return tuple(MODELS)
    if not names:
        raise ValueError("give at least one metric, e.g. temp,hum")
    for name in names:
        if name not in MODELS:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(MODELS)} or all")
    if len(set(names)) != len(names):
        raise ValueError(f"a metric is listed twice in {text!r}")
    return tuple(names)


class SensorSignals:
    """The metrics of one sensor; `sample(t)` returns the readings map of one datagram."""

    __slots__ = ("_models",)

    def __init__(self, names: Iterable[str], rng: random.Random, t0: float) -> None:
        self._models = [(name, MODELS[name](rng, t0).sample) for name in names]

    def sample(self, t: float) -> dict[str, int | float]:
        return {name: sample(t) for name, sample in self._models}
