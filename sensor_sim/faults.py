"""Fault injection (loss, duplication, bounded reordering) and its ground truth.

`Faults.admit` decides, from a seeded `random.Random`, what happens to each
datagram a sensor generates: dropped, sent, sent twice, or held back and sent
after up to `max_hold` later datagrams of the same sensor.  It only returns
the order of emissions; it never touches a socket.  `Truth` is the per-sensor
ledger of what was actually sent, filled in by the sender after each sendto,
so the report matches what a receiver on loopback sees exactly.

Indices (`idx`) count datagrams of one sensor from 0; the seq on the wire is
(first_seq + idx) mod 2**32, so "higher" is always well defined, across
wraparound too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, NamedTuple

SEQ_MASK = 0xFFFFFFFF
# A held datagram is released after at most this many later datagrams of its
# sensor were generated, so no datagram is ever displaced by more than
# MAX_HOLD seqs: far inside the collector's 4096-seq window (collector.sequence.WINDOW).
MAX_HOLD = 3


@dataclass(frozen=True)
class FaultRates:
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"{name} probability must be in [0, 1], got {value!r}")

    @property
    def any(self) -> bool:
        return bool(self.loss or self.duplicate or self.reorder)


class Emission(NamedTuple):
    """One sendto to make: datagram `idx` of a sensor; `copy` marks the duplicate copy."""

    idx: int
    payload: bytes
    copy: bool


class Faults:
    """Seeded decisions for every generated datagram; state lives in the caller's `held` list.

    `held` is one list per sensor of [remaining, idx, payload, duplicate]
    entries; `remaining` counts how many more later datagrams must be
    generated before the entry is released.
    """

    def __init__(self, rates: FaultRates, rng: random.Random, max_hold: int = MAX_HOLD) -> None:
        if max_hold < 1:
            raise ValueError("max_hold must be >= 1")
        self.rates = rates
        self.rng = rng
        self.max_hold = max_hold

    def admit(self, held: list[list[Any]], idx: int, payload: bytes) -> tuple[bool, list[Emission]]:
        """Decide the fate of datagram `idx`; returns (dropped, emissions to make now, in order)."""
        rng, rates = self.rng, self.rates
        out: list[Emission] = []
        # Entries held before this datagram have now been overtaken by one more.
        released = []
        for entry in held:
            entry[0] -= 1
            if entry[0] <= 0:
                released.append(entry)
        dropped = rates.loss > 0.0 and rng.random() < rates.loss
        if not dropped:
            duplicate = rates.duplicate > 0.0 and rng.random() < rates.duplicate
            if rates.reorder > 0.0 and rng.random() < rates.reorder:
                held.append([rng.randint(1, self.max_hold), idx, payload, duplicate])
            else:
                out.append(Emission(idx, payload, False))
                if duplicate:
                    out.append(Emission(idx, payload, True))
        for entry in released:  # after the newer datagram: that is the reordering
            held.remove(entry)
            out.extend(_emit(entry))
        return dropped, out

    @staticmethod
    def drain(held: list[list[Any]]) -> list[Emission]:
        """Release everything still held (end of run), oldest first."""
        out: list[Emission] = []
        for entry in sorted(held, key=lambda e: e[1]):
            out.extend(_emit(entry))
        held.clear()
        return out


def _emit(entry: list[Any]) -> list[Emission]:
    _, idx, payload, duplicate = entry
    first = Emission(idx, payload, False)
    return [first, Emission(idx, payload, True)] if duplicate else [first]


class Truth:
    """Ground truth of one sensor: what was generated, dropped, and actually sent."""

    __slots__ = (
        "boot",
        "first_seq",
        "generated",
        "dropped",
        "duplicated",
        "reordered",
        "reordered_copies",
        "send_failed",
        "_highest",
    )

    def __init__(self, boot: int | None, first_seq: int) -> None:
        self.boot = boot
        self.first_seq = first_seq
        self.generated = 0
        self.dropped: list[int] = []
        self.duplicated: list[int] = []
        self.reordered = 0
        # Second copies among the reordered: a receiver calls such a copy a
        # duplicate, not reordered, so it needs them apart to be exact.
        self.reordered_copies = 0
        self.send_failed: list[int] = []
        self._highest = -1  # highest idx sent so far

    def seq(self, idx: int) -> int:
        return (self.first_seq + idx) & SEQ_MASK

    def sent(self, idx: int, copy: bool) -> None:
        """Record a datagram that reached the network (at least one sendto succeeded)."""
        if idx < self._highest:
            self.reordered += 1
            self.reordered_copies += copy
        else:
            self._highest = idx
        if copy:
            self.duplicated.append(self.seq(idx))

    def as_dict(self) -> dict[str, Any]:
        return {
            "boot": self.boot,
            "first_seq": self.first_seq,
            "generated": self.generated,
            "dropped": self.dropped,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "reordered_copies": self.reordered_copies,
            "send_failed": self.send_failed,
        }
