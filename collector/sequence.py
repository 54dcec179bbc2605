"""Per-sensor sequence accounts: observe(boot, seq, now) -> what happened.

Pure code: no sockets, no clock (`now` is a parameter, used only to stamp gap
records).  For each sensor a `SensorTracker` turns the (boot, seq) of every
valid datagram into one event and keeps exact accounts: within a stream,
`lost` is the number of seqs in [lowest received, highest received] not
received (in extended, wrap-free seqs), and the open gaps are exactly that
missing set.  Every event except `Duplicate` means "store this datagram":
restart detection and probation decide how the accounts read a datagram, never
whether its readings are kept.  docs/SEQUENCE.md states the rules with the
reasons; RFC 3550 Appendix A.1 (restart detection) and RFC 4303 3.4.3
(duplicate window) are cited where they apply.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

# --- Constants (seq and boot are uint32; 2**32-1 -> 0 is in order) ---------

_MOD = 1 << 32
_MASK = _MOD - 1  # written as the literal 0xFFFFFFFF on the hot path
_HALF = 1 << 31  # a seq more than this far from the highest reads as the other direction

# How far behind the highest seq a datagram is still "reordered or duplicate"
# rather than a restart candidate (RFC 3550's MAX_MISORDER), and the span in
# which duplicates are always recognised (the RFC 4303 3.4.3 anti-replay
# window).  One number for both, so every datagram the RFC logic calls
# "misordered" can be checked for being a duplicate.  4096 seqs is over an
# hour at 1 Hz, far beyond any network reordering; a larger value would make a
# boot-less sensor that resets to seq 0 early in its life read as duplicates
# for longer (see docs/SEQUENCE.md: send `boot`).
WINDOW = 4096
MAX_MISORDER = WINDOW
# A forward jump of fewer than MAX_DROPOUT seqs is a gap (lost datagrams); a
# larger one is a restart candidate needing MIN_SEQUENTIAL sequential
# datagrams to confirm (RFC 3550 A.1).  2**20 is 12 days of outage at 1 Hz;
# a sensor resetting to a random seq lands in that range with p = 1/4096.
MAX_DROPOUT = 1 << 20
MIN_SEQUENTIAL = 2
# Remembered (still fillable) gaps.  Every gap that reaches into a stream's
# window (the WINDOW seqs below its highest) is kept, so duplicate detection
# and late fills there stay exact: a window holds at most WINDOW // 2 + 1 gaps.
# Of the gaps wholly behind the windows only the MAX_OLD_GAPS highest are kept
# (for a datagram delayed across a long outage); older ones are forgotten:
# they stay lost, their rows in the database stay final, a datagram filling
# one is a Stray.  A sensor's gaps live in compact arrays (24 bytes each), so
# a tracker holds at most MAX_OPEN_GAPS of them, whatever the loss pattern:
# bench/tracker_memory.py measures the bytes per sensor.
MAX_OLD_GAPS = 128
MAX_OPEN_GAPS = 2 * (WINDOW // 2 + 1) + MAX_OLD_GAPS  # current + previous stream's windows, + old ones
assert MAX_OPEN_GAPS > WINDOW // 2 and MAX_MISORDER <= WINDOW < _HALF and MAX_DROPOUT < _HALF

SNAPSHOT_VERSION = 1


# --- Events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class First:
    """The sensor's very first datagram: it starts stream 0; no gap before it."""


@dataclass(frozen=True, slots=True)
class InOrder:
    """The next seq after the highest (2**32-1 -> 0 included)."""


@dataclass(frozen=True, slots=True)
class Gap:
    """In order, and seqs first..last (uint32, may wrap) are newly missing."""

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Late:
    """Filled one seq of an open gap (no longer lost); counts as reordered."""

    seq: int


@dataclass(frozen=True, slots=True)
class Reordered:
    """Arrived after a higher seq but was in no gap: below the stream's base
    (the base moves down, seqs between become a gap), or a straggler of the
    previous boot's stream arriving after the new boot began."""

    seq: int


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Already received: do not store."""


@dataclass(frozen=True, slots=True)
class Restart:
    """A new stream: reason "boot" (boot changed; it starts with this
    datagram) or "seq_jump" (RFC 3550 resync, confirmed by this datagram; the
    new stream starts with the Stray just before it, seq - 1)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Stray:
    """Far from the stream (RFC 3550 "very large jump") and in no open gap:
    stored, left out of the accounts unless seq + 1 follows and confirms a
    restart.  An addition to the first agreed event list; like every event
    but Duplicate it means "store"."""

    seq: int


Event = First | InOrder | Gap | Late | Reordered | Duplicate | Restart | Stray

# Field-less events are shared: frozen, so one instance each saves an
# allocation per datagram on the hot path.
_FIRST = First()
_IN_ORDER = InOrder()
_DUPLICATE = Duplicate()
_RESTART_BOOT = Restart("boot")
_RESTART_JUMP = Restart("seq_jump")


@dataclass(frozen=True, slots=True)
class GapRecord:
    """One run of missing seqs, as a row of the `gaps` table (seqs are uint32)."""

    stream: int
    boot: int | None
    first_seq: int
    last_seq: int
    missing: int
    detected_at: float


# --- State --------------------------------------------------------------------


class _Unset:
    """The boot of a tracker that has seen nothing: equal to no boot value."""

    __slots__ = ()


_UNSET = _Unset()


class _Stream:
    """One stream: extended seqs base..max, and its remembered gaps.

    Gaps are three parallel arrays sorted by first seq (extended): starts and
    ends as int64, detection times as float64, 24 bytes a gap where a list of
    Python objects cost ~110; a seq is found with one bisect.  Gaps below
    `floor` were forgotten (MAX_OLD_GAPS, or too far behind to be reachable):
    they stay lost, no longer fillable.
    """

    __slots__ = ("stream", "boot", "base", "max", "floor", "starts", "ends", "times")

    def __init__(self, stream: int, boot: int | None | _Unset, base: int, max_: int, floor: int | None = None) -> None:
        self.stream = stream
        self.boot = boot
        self.base = base
        self.max = max_
        self.floor = floor
        self.starts = array("q")
        self.ends = array("q")
        self.times = array("d")

    def old_gaps(self) -> int:
        """How many of its gaps lie wholly behind its window (forgettable)."""
        return bisect_left(self.ends, self.max - WINDOW)

    def find(self, ext: int) -> int:
        """Index of the remembered gap holding `ext`, or -1."""
        i = bisect_right(self.starts, ext) - 1
        return i if i >= 0 and self.ends[i] >= ext else -1

    def forget_first(self) -> None:
        self.floor = self.ends[0] + 1
        del self.starts[0], self.ends[0], self.times[0]

    def prune(self) -> None:
        # A gap wholly more than 2**31 behind the highest can never be
        # reached (such a seq reads as ahead), so forgetting it changes no
        # behaviour; it keeps uint32 gap keys unique within the stream.
        while self.starts and self.ends[0] < self.max - _HALF:
            self.forget_first()

    def to_dict(self) -> dict:
        return {"stream": self.stream, "boot": self.boot, "base": self.base, "max": self.max, "floor": self.floor}


def _stream_from_dict(d: dict) -> _Stream:
    boot = d["boot"]
    if boot is not None and type(boot) is not int:
        raise ValueError(f"bad boot in tracker snapshot: {boot!r}")
    return _Stream(
        int(d["stream"]), boot, int(d["base"]), int(d["max"]), None if d["floor"] is None else int(d["floor"])
    )


class SensorTracker:
    """Sequence accounts for one sensor, across its streams (one per boot/restart).

    Counters (cumulative over the sensor's streams): `datagrams` (accepted,
    i.e. every event but Duplicate), `lost` (seqs currently missing; a
    forgotten or ended stream's gaps stay lost), `duplicates`, `reordered`
    (Late and Reordered events), `restarts`.  `stream` is 0 for the first
    stream, +1 per restart.
    """

    __slots__ = (
        "datagrams",
        "lost",
        "duplicates",
        "reordered",
        "restarts",
        "stream",
        "_cur",
        "_prev",
        "_bad_seq",
        "_changes",
        "_fresh",
    )

    def __init__(self) -> None:
        self.datagrams = 0
        self.lost = 0
        self.duplicates = 0
        self.reordered = 0
        self.restarts = 0
        self.stream = 0
        self._cur = _Stream(0, _UNSET, 0, 0)  # placeholder until the first datagram
        # The stream before a boot change, kept so that its late stragglers
        # (old boot, arriving after the new boot began) are accounted to it
        # instead of reading as two more restarts.
        self._prev: _Stream | None = None
        self._bad_seq: int | None = None  # RFC 3550 bad_seq: Stray seq + 1, awaiting confirmation
        self._changes: dict[tuple[int, int], GapRecord | None] = {}
        self._fresh: set[tuple[int, int]] = set()  # keys inserted since the last pop

    @property
    def position(self) -> int:
        """The highest seq of the current stream, unwrapped (it keeps growing past 2**32)."""
        return self._cur.max

    # -- the hot path --

    def observe(self, boot: int | None, seq: int, now: float) -> Event:
        """Account one valid datagram (boot, seq uint32); anything but Duplicate is to be stored."""
        s = self._cur
        if boot == s.boot:
            delta = (seq - s.max) & 0xFFFFFFFF
            if delta == 1:
                s.max += 1
                self.datagrams += 1
                return _IN_ORDER
            return self._same_boot(s, seq, delta, now)
        return self._other_boot(boot, seq, now)

    # -- everything else --

    def _same_boot(self, s: _Stream, seq: int, delta: int, now: float) -> Event:
        if delta == 0:
            self.duplicates += 1
            return _DUPLICATE
        if delta < MAX_DROPOUT:
            first = s.max + 1
            s.max += delta
            self._new_gap(s, first, s.max - 1, now, at_end=True)
            self.datagrams += 1
            return Gap(first & _MASK, (s.max - 1) & _MASK)
        if delta >= _MOD - MAX_MISORDER:
            return self._behind(s, seq, s.max - (_MOD - delta), now)
        # RFC 3550 A.1 "very large jump", forwards or backwards.
        if delta > _HALF:
            ext = s.max - (_MOD - delta)
            i = s.find(ext)
            if i >= 0:  # a remembered gap beats the jump logic: it is a late datagram
                return self._late(s, i, ext, seq)
        if seq == self._bad_seq:
            # Two sequential datagrams: the sensor restarted without telling
            # us (RFC 3550 resync).  The new stream began with the Stray.
            self._bad_seq = None
            self.stream += 1
            self.restarts += 1
            self.datagrams += 1
            base = (seq - 1) & _MASK
            self._cur = _Stream(self.stream, s.boot, base, base + 1)
            return _RESTART_JUMP
        self._bad_seq = (seq + 1) & _MASK
        self.datagrams += 1
        return Stray(seq)

    def _behind(self, s: _Stream, seq: int, ext: int, now: float) -> Event:
        """A seq within WINDOW behind the stream's highest: duplicate, late, or below the base."""
        if ext >= s.base:
            i = s.find(ext)
            if i < 0:
                self.duplicates += 1
                return _DUPLICATE
            return self._late(s, i, ext, seq)
        # The stream's first datagram was itself reordered: extend the base
        # downwards; the seqs between were never received, so they are lost.
        if ext < s.base - 1:
            self._new_gap(s, ext + 1, s.base - 1, now, at_end=False)
        s.base = ext
        self.reordered += 1
        self.datagrams += 1
        return Reordered(seq)

    def _late(self, s: _Stream, i: int, ext: int, seq: int) -> Late:
        a, b, t = s.starts[i], s.ends[i], s.times[i]
        if a == b:
            del s.starts[i], s.ends[i], s.times[i]
            self._delete(s, a)
        elif ext == a:  # shrink at the front: the key moves
            s.starts[i] = a + 1
            self._delete(s, a)
            self._put(s, a + 1, b, t, fresh=True)
        elif ext == b:  # shrink at the back: same key
            s.ends[i] = b - 1
            self._put(s, a, b - 1, t, fresh=False)
        else:  # split
            s.ends[i] = ext - 1
            s.starts.insert(i + 1, ext + 1)
            s.ends.insert(i + 1, b)
            s.times.insert(i + 1, t)
            self._put(s, a, ext - 1, t, fresh=False)
            self._put(s, ext + 1, b, t, fresh=True)
        self.lost -= 1
        self.reordered += 1
        self.datagrams += 1
        return Late(seq)

    def _other_boot(self, boot: int | None, seq: int, now: float) -> Event:
        cur = self._cur
        if cur.boot is _UNSET:
            self._cur = _Stream(0, boot, seq, seq)
            self.datagrams += 1
            return _FIRST
        p = self._prev
        # A straggler is overtaken by a few of the new boot's datagrams, not
        # by a window's worth: past that, the old boot value is a new run (a
        # sensor reusing boot values) and must not be read as old duplicates.
        if p is not None and boot == p.boot and cur.max - cur.base < WINDOW:
            return self._straggler(p, seq, now)
        self._prev = cur  # the previous stream before it is forgotten
        self._bad_seq = None
        self.stream += 1
        self.restarts += 1
        self.datagrams += 1
        self._cur = _Stream(self.stream, boot, seq, seq)
        return _RESTART_BOOT

    def _straggler(self, p: _Stream, seq: int, now: float) -> Event:
        """A datagram of the previous boot's stream, arriving after the new boot began."""
        delta = (seq - p.max) & _MASK
        if delta == 0:
            self.duplicates += 1
            return _DUPLICATE
        if delta < MAX_DROPOUT:  # the old stream's tail: extends it
            if delta > 1:
                self._new_gap(p, p.max + 1, p.max + delta - 1, now, at_end=True)
            p.max += delta
            self.reordered += 1
            self.datagrams += 1
            return Reordered(seq)
        if delta >= _MOD - MAX_MISORDER:
            return self._behind(p, seq, p.max - (_MOD - delta), now)
        if delta > _HALF:
            ext = p.max - (_MOD - delta)
            i = p.find(ext)
            if i >= 0:
                return self._late(p, i, ext, seq)
        # No restart logic for an ended stream: keep it, account nothing.
        self.datagrams += 1
        return Stray(seq)

    def _new_gap(self, s: _Stream, a: int, b: int, now: float, *, at_end: bool) -> None:
        self.lost += b - a + 1
        if at_end:
            s.starts.append(a)
            s.ends.append(b)
            s.times.append(now)
            s.prune()
        else:
            s.starts.insert(0, a)
            s.ends.insert(0, b)
            s.times.insert(0, now)
        self._put(s, a, b, now, fresh=True)
        cur, p = self._cur, self._prev
        old_prev = p.old_gaps() if p is not None else 0
        excess = cur.old_gaps() + old_prev - MAX_OLD_GAPS
        while excess > 0:
            # Forget the oldest behind the windows: the previous stream's first, then the lowest.
            if old_prev:
                assert p is not None  # old_prev counts p's gaps
                p.forget_first()
                old_prev -= 1
            else:
                cur.forget_first()
            excess -= 1

    # -- gap change log (what the collector writes at each flush) --

    def _put(self, s: _Stream, a: int, b: int, t: float, *, fresh: bool) -> None:
        key = (s.stream, a & _MASK)
        # Only a stream that saw a datagram has gaps, so its boot is set.
        self._changes[key] = GapRecord(s.stream, cast("int | None", s.boot), key[1], b & _MASK, b - a + 1, t)
        if fresh:
            self._fresh.add(key)

    def _delete(self, s: _Stream, a: int) -> None:
        key = (s.stream, a & _MASK)
        if key in self._fresh:  # never written: nothing to delete
            self._fresh.discard(key)
            del self._changes[key]
        else:
            self._changes[key] = None

    def pop_gap_changes(self) -> dict[tuple[int, int], GapRecord | None]:
        """Net gap-row changes since the last call, keyed (stream, first_seq):
        a GapRecord to insert or replace, or None to delete that row.  A
        forgotten gap is never deleted: its row stays as final."""
        changes = self._changes
        self._changes = {}
        self._fresh = set()
        return changes

    def open_gaps(self) -> list[GapRecord]:
        """The remembered (still fillable) gaps, oldest stream first, by seq."""
        out = []
        for s in (self._prev, self._cur):
            if s is None:
                continue
            for a, b, t in zip(s.starts, s.ends, s.times):
                out.append(GapRecord(s.stream, cast("int | None", s.boot), a & _MASK, b & _MASK, b - a + 1, t))
        return out

    # -- persistence --

    def snapshot(self) -> dict:
        """JSON-serialisable state without the gaps (they live in the gaps
        table).  Take it right after pop_gap_changes, and store both together."""
        for s in (self._prev, self._cur):
            if s is not None:
                s.prune()
        cur = self._cur
        return {
            "v": SNAPSHOT_VERSION,
            "datagrams": self.datagrams,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "restarts": self.restarts,
            "stream": self.stream,
            "bad_seq": self._bad_seq,
            "cur": None if cur.boot is _UNSET else cur.to_dict(),
            "prev": None if self._prev is None else self._prev.to_dict(),
        }

    @classmethod
    def restore(cls, snapshot: dict, gaps: Iterable[GapRecord]) -> SensorTracker:
        """A tracker that behaves exactly like the one `snapshot` was taken
        from, given the sensor's gap rows as of that moment.  Rows of older
        streams and forgotten rows are recognised and left alone."""
        if snapshot.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"tracker snapshot version {snapshot.get('v')!r} is not {SNAPSHOT_VERSION}")
        t = cls()
        t.datagrams = int(snapshot["datagrams"])
        t.lost = int(snapshot["lost"])
        t.duplicates = int(snapshot["duplicates"])
        t.reordered = int(snapshot["reordered"])
        t.restarts = int(snapshot["restarts"])
        t.stream = int(snapshot["stream"])
        bad = snapshot["bad_seq"]
        t._bad_seq = None if bad is None else int(bad)
        if snapshot["cur"] is not None:
            t._cur = _stream_from_dict(snapshot["cur"])
        if snapshot["prev"] is not None:
            t._prev = _stream_from_dict(snapshot["prev"])
        streams = {s.stream: s for s in (t._prev, t._cur) if s is not None and s.boot is not _UNSET}
        found: dict[int, list[tuple[int, int, float]]] = {k: [] for k in streams}
        for g in gaps:
            s = streams.get(g.stream)
            if s is None:
                continue  # an older stream's gap: final
            # Remembered gaps lie within 2**31 below the highest (prune()),
            # so the uint32 seq maps back to one extended seq.
            a = s.max - ((s.max - g.first_seq) & _MASK)
            b = a + ((g.last_seq - g.first_seq) & _MASK)
            if (s.floor is not None and a < s.floor) or a <= s.base or b >= s.max:
                continue  # forgotten: stays lost, not fillable
            found[g.stream].append((a, b, float(g.detected_at)))
        for k, rows in found.items():
            s = streams[k]
            rows.sort()
            for a, b, when in rows:
                if s.ends and a <= s.ends[-1]:
                    raise ValueError(f"overlapping gap rows for stream {k}")
                s.starts.append(a)
                s.ends.append(b)
                s.times.append(when)
        return t
