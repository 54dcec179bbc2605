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
# What a tracker remembers is the state of the window alone: per stream a
# bitmap of the WINDOW seqs behind the highest (bit set = missing), plus the
# first seq of the missing run that reaches below it.  A gap wholly behind the
# window is final: it stays lost, its row in the database stays, and a
# datagram for one of its seqs is a Stray (stored, not accounted).  So a
# tracker holds at most two bitmaps of WINDOW bits (the current stream's and
# the previous boot's; WINDOW + _SLACK bits), ~0.6 KB each whatever the loss pattern; the gap rows
# live in the database (bench/tracker_memory.py measures the bytes per sensor).
assert MAX_MISORDER <= WINDOW < _HALF and MAX_DROPOUT < _HALF

SNAPSHOT_VERSION = 2  # v1 (with a forget floor) is still read


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
IN_ORDER = _IN_ORDER  # the one instance: callers on the hot path may test `event is IN_ORDER`
_DUPLICATE = Duplicate()
_RESTART_BOOT = Restart("boot")
_RESTART_JUMP = Restart("seq_jump")


@dataclass(frozen=True, slots=True)
class GapRecord:
    """One run of missing seqs, as a row of the `gaps` table (seqs are uint32).

    In the change log (`pop_gap_changes`) a record that is a piece of a row
    already written (a late datagram shrank or split it) carries
    `detected_at=None` and `origin`: the first_seq of that stored row (same
    stream), whose detected_at it keeps.  The tracker does not hold detection
    times of written rows; the writer copies it (collector/store.py).
    """

    stream: int
    boot: int | None
    first_seq: int
    last_seq: int
    missing: int
    detected_at: float | None
    origin: int | None = None


# --- State --------------------------------------------------------------------


class _Unset:
    """The boot of a tracker that has seen nothing: equal to no boot value."""

    __slots__ = ()


_UNSET = _Unset()
# The bitmap slides by at least this many seqs at a time, so that a run of
# in-order datagrams costs one shift per _SLACK seqs, not one per datagram.
_SLACK = 512
_NEAR = (1 << 129) - 1
_ABSENT = object()  # no entry in the change log


class _Stream:
    """One stream: extended seqs base..max, and the missing seqs of its window.

    `miss` is an int used as a bitmap: bit i set means extended seq `lo + i`
    is missing.  Only seqs in [base, max) can be missing.  An in-order
    datagram only moves `max` (the hot path touches no bitmap); the bitmap is
    slid to `lo = max - WINDOW` before any other use (`sync`), dropping the
    bits of seqs that left the window (those gaps are final).  `edge` is the
    first seq of the missing run holding `lo`, valid while bit 0 is set: such
    a run began below the window, and its row is keyed by that seq.
    """

    __slots__ = ("stream", "boot", "base", "max", "lo", "miss", "edge")

    def __init__(self, stream: int, boot: int | None | _Unset, base: int, max_: int) -> None:
        self.stream = stream
        self.boot = boot
        self.base = base
        self.max = max_
        self.lo = max_ - WINDOW
        self.miss = 0
        self.edge = 0

    def sync(self) -> None:
        """Slide the bitmap so that bit 0 is at most _SLACK seqs below the
        window's lowest (bits below the window are exact but never read as
        fillable: the callers check the window on max first)."""
        target = self.max - WINDOW
        shift = target - self.lo
        if shift <= _SLACK:
            return
        miss = self.miss
        self.lo = target
        if not miss:
            return
        if shift >= miss.bit_length():
            self.miss = 0
            return
        new = miss >> shift
        self.miss = new
        if new & 1:
            # The run holding the new lowest seq: it began at the highest
            # received seq sliding out + 1, or (all sliding out missing) at edge.
            received = ~miss & ((1 << shift) - 1)
            if received:
                self.edge = target - shift + received.bit_length()

    def missing(self, ext: int) -> bool:
        """Is `ext` (in the window, synced) missing?"""
        return bool((self.miss >> (ext - self.lo)) & 1)

    def run(self, ext: int) -> tuple[int, int]:
        """The missing run (first, last) holding `ext` (missing, synced)."""
        i = ext - self.lo
        m = self.miss
        # Most runs are short: look at the 129 bits around ext first (small
        # ints), and at the whole bitmap only when the run leaves them.
        k = i - 64 if i > 64 else 0
        w = (m >> k) & _NEAR
        j = i - k
        x = w >> j
        up = (x ^ (x + 1)).bit_length() - 1  # x's trailing ones: ext and the missing seqs above it
        if up >= 129 - j:
            x = m >> i
            up = (x ^ (x + 1)).bit_length() - 1
        received = ~w & ((1 << j) - 1)
        if received:
            first = self.lo + k + received.bit_length()
        elif k == 0:
            first = self.edge
        else:
            received = ~m & ((1 << i) - 1)
            first = self.lo + received.bit_length() if received else self.edge
        return first, ext + up - 1

    def mark(self, a: int, b: int) -> None:
        """Seqs a..b (b in the window, synced) are missing."""
        lo = self.lo
        if a <= lo:
            self.miss |= (1 << (b - lo + 1)) - 1
            self.edge = a
        else:
            self.miss |= ((1 << (b - a + 1)) - 1) << (a - lo)

    def runs(self) -> list[tuple[int, int]]:
        """The missing runs in the bitmap (synced), lowest first."""
        out = []
        m, lo = self.miss, self.lo
        while m:
            i = (m & -m).bit_length() - 1
            x = m >> i
            n = (x ^ (x + 1)).bit_length() - 1
            out.append((self.edge if i == 0 else lo + i, lo + i + n - 1))
            m &= ~(((1 << n) - 1) << i)
        return out

    def to_dict(self) -> dict:
        return {"stream": self.stream, "boot": self.boot, "base": self.base, "max": self.max}


def _stream_from_dict(d: dict) -> _Stream:
    boot = d["boot"]
    if boot is not None and type(boot) is not int:
        raise ValueError(f"bad boot in tracker snapshot: {boot!r}")
    return _Stream(int(d["stream"]), boot, int(d["base"]), int(d["max"]))


class SensorTracker:
    """Sequence accounts for one sensor, across its streams (one per boot/restart).

    Counters (cumulative over the sensor's streams): `datagrams` (accepted,
    i.e. every event but Duplicate), `lost` (seqs currently missing; a gap
    that left the window or an ended stream's gaps stay lost), `duplicates`,
    `reordered` (Late and Reordered events), `restarts`.  `stream` is 0 for
    the first stream, +1 per restart.
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
        # Gap rows changed since the last pop (emptied at each flush).
        self._changes: dict[tuple[int, int], GapRecord | None] = {}
        # Keys not written yet; None for none (an empty set costs 216 bytes a sensor).
        self._fresh: set[tuple[int, int]] | None = None

    @property
    def position(self) -> int:
        """The highest seq of the current stream, unwrapped (it keeps growing past 2**32)."""
        return self._cur.max

    # -- the hot path --

    def observe(self, boot: int | None, seq: int, now: float) -> Event:
        """Account one valid datagram (boot, seq uint32); anything but Duplicate is to be stored.

        IngestCore.receive_many runs the in-order case (the first branch, to
        `return _IN_ORDER`) inline and calls this for every other datagram: a
        change to that case is made there too (tests/test_ingest.py compares
        receive_many with receive, which calls this)."""
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
            self._new_gap(s, first, s.max - 1, now)
            self.datagrams += 1
            return Gap(first & _MASK, (s.max - 1) & _MASK)
        if delta >= _MOD - MAX_MISORDER:
            return self._behind(s, seq, s.max - (_MOD - delta), now)
        # RFC 3550 A.1 "very large jump", forwards or backwards (a seq older
        # than the window: its gap, if it had one, is final).
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
        s.sync()
        if ext >= s.base:
            if not s.missing(ext):
                self.duplicates += 1
                return _DUPLICATE
            return self._late(s, ext, seq)
        # The stream's first datagram was itself reordered: extend the base
        # downwards; the seqs between were never received, so they are lost.
        if ext < s.base - 1:
            self._new_gap(s, ext + 1, s.base - 1, now)
        s.base = ext
        self.reordered += 1
        self.datagrams += 1
        return Reordered(seq)

    def _late(self, s: _Stream, ext: int, seq: int) -> Late:
        a, b = s.run(ext)
        s.miss ^= 1 << (ext - s.lo)
        key = (s.stream, a & _MASK)
        # The row this run is: a piece keeps its detection time, known for
        # a row not written yet, else copied from the stored row (origin).
        t: float | None = None
        origin: int | None = key[1]
        rec = self._changes.get(key, _ABSENT)
        if rec is not _ABSENT:
            assert isinstance(rec, GapRecord)  # a run that exists has no delete pending
            t, origin = rec.detected_at, rec.origin
        if a == b:
            self._delete(key)
        elif ext == a:  # shrink at the front: the key moves
            self._delete(key)
            self._put(s, a + 1, b, t, origin, fresh=True)
        elif ext == b:  # shrink at the back: same key
            self._put(s, a, b - 1, t, origin, fresh=False)
        else:  # split
            self._put(s, a, ext - 1, t, origin, fresh=False)
            self._put(s, ext + 1, b, t, origin, fresh=True)
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
            first = p.max + 1
            p.max += delta
            if delta > 1:
                self._new_gap(p, first, p.max - 1, now)
            self.reordered += 1
            self.datagrams += 1
            return Reordered(seq)
        if delta >= _MOD - MAX_MISORDER:
            return self._behind(p, seq, p.max - (_MOD - delta), now)
        # No restart logic for an ended stream: keep it, account nothing.
        self.datagrams += 1
        return Stray(seq)

    def _new_gap(self, s: _Stream, a: int, b: int, now: float) -> None:
        """Seqs a..b (extended; b below the highest, in the window) are newly missing."""
        self.lost += b - a + 1
        s.sync()
        s.mark(a, b)
        self._put(s, a, b, now, None, fresh=True)

    # -- gap change log (what the collector writes at each flush) --

    def _put(self, s: _Stream, a: int, b: int, t: float | None, origin: int | None, *, fresh: bool) -> None:
        key = (s.stream, a & _MASK)
        # Only a stream that saw a datagram has gaps, so its boot is set.
        self._changes[key] = GapRecord(s.stream, cast("int | None", s.boot), key[1], b & _MASK, b - a + 1, t, origin)
        if fresh:
            if self._fresh is None:
                self._fresh = {key}
            else:
                self._fresh.add(key)

    def _delete(self, key: tuple[int, int]) -> None:
        fresh = self._fresh
        if fresh is not None and key in fresh:  # never written: nothing to delete
            fresh.discard(key)
            del self._changes[key]
        else:
            self._changes[key] = None

    def pop_gap_changes(self) -> dict[tuple[int, int], GapRecord | None]:
        """Net gap-row changes since the last call, keyed (stream, first_seq):
        a GapRecord to insert or replace, or None to delete that row.  A
        record with detected_at None keeps the detected_at of the row keyed
        (stream, origin) as stored before these changes (see GapRecord).  A
        gap that left the window is final: its row is never deleted."""
        changes = self._changes
        self._changes = {}
        self._fresh = None
        return changes

    def open_gaps(self) -> list[GapRecord]:
        """The gaps reaching into the windows (still fillable), oldest stream
        first, by seq; detected_at is None where the tracker no longer knows it
        (a row already written: the database holds it)."""
        out = []
        for s in (self._prev, self._cur):
            if s is None or s.boot is _UNSET:
                continue
            s.sync()
            for a, b in s.runs():
                if b < s.max - WINDOW:
                    continue  # below the window: final
                rec = self._changes.get((s.stream, a & _MASK))
                t = rec.detected_at if rec is not None else None
                out.append(GapRecord(s.stream, cast("int | None", s.boot), a & _MASK, b & _MASK, b - a + 1, t))
        return out

    # -- persistence --

    def snapshot(self) -> dict:
        """JSON-serialisable state without the gaps (they live in the gaps
        table).  Take it right after pop_gap_changes, and store both together."""
        cur, prev = self._cur, self._prev
        if prev is not None and cur.max - cur.base >= WINDOW:
            # The previous boot takes no more stragglers (see _other_boot):
            # its gaps are final, so it need not be kept.
            self._prev = prev = None
        for s in (prev, cur):
            if s is not None:
                s.sync()
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
            "prev": None if prev is None else prev.to_dict(),
        }

    @classmethod
    def restore(cls, snapshot: dict, gaps: Iterable[GapRecord]) -> SensorTracker:
        """A tracker that behaves exactly like the one `snapshot` was taken
        from, given the sensor's gap rows as of that moment (any iterable:
        only the rows reaching into a window are kept).  Rows of older
        streams and final rows are recognised and left alone."""
        if snapshot.get("v") not in (1, SNAPSHOT_VERSION):
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
        for g in gaps:
            s = streams.get(g.stream)
            if s is None:
                continue  # an older stream's gap: final
            # A row reaching into the window lies within 2**31 below the
            # highest, so its uint32 seqs map back to one extended seq.
            b = s.max - ((s.max - g.last_seq) & _MASK)
            a = b - ((g.last_seq - g.first_seq) & _MASK)
            if b < s.lo or a <= s.base or b >= s.max:
                continue  # behind the window (final), or not a gap of this stream's range
            lo = max(a, s.lo)
            span = ((1 << (b - lo + 1)) - 1) << (lo - s.lo)
            if s.miss & span:
                raise ValueError(f"overlapping gap rows for stream {g.stream}")
            s.mark(a, b)
        return t
