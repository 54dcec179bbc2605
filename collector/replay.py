"""Anti-replay window for signed datagrams: accept each (boot, seq) once, strictly.

Pure code: no sockets, no clock.  One `ReplayWindow` per sensor answers
`check(boot, seq)` (True = fresh) without changing anything, and `accept(boot,
seq)` records a pair; the collector calls `accept` only after the tag has
verified and the body decoded (RFC 4303 section 3.4.3: a datagram that failed
authentication must never move the window).  The rules are the IPsec
anti-replay window (RFC 4303 3.4.3 and Appendix A) with `boot` in front:

* a boot below the highest accepted boot is replayed;
* a boot above it starts the window afresh at this seq;
* under the same boot, a bitmap remembers the last W seqs at or below the
  highest accepted one: a seq above the highest slides the window forward, one
  inside it is fresh once, one older than the window is replayed even if it
  was never seen (it cannot be told from a replay).

Plain comparisons suffice: a signing sensor never wraps seq under one boot
(docs/PROTOCOL.md), so there is no modular arithmetic and, as boot is always
present, no restart to guess.  This is deliberately separate from the
accounting tracker (collector/sequence.py), which is lenient on purpose
(a far-behind seq there is a Stray and stored); here the verdict is strict.
"""

from __future__ import annotations

from .sequence import WINDOW

SNAPSHOT_VERSION = 1
# Rejection reason of this module, counted as `rejected:replayed` next to
# wire.REASONS and auth.REASONS.
REASONS = ("replayed",)

_MASK = (1 << WINDOW) - 1
# The bitmap is a Python int: bit d set means seq `top - d` was accepted.
# Sliding forward is one shift; we trim to W bits only when it has grown 512
# past W, so an in-order datagram costs one shift and one OR, with a mask one
# time in 512 (bits beyond W are never read: check answers "replayed" for
# d >= W first).  Measured on CPython 3.11 with W = 4096: check + accept of an
# in-order pair 0.34 us (0.37 us when trimming at 2W or at every W + 64), a
# check inside the window 0.25 us.
_TRIM_BITS = WINDOW + 512


class ReplayWindow:
    """The accepted (boot, seq) pairs of one sensor, as boot + highest seq + bitmap."""

    __slots__ = ("boot", "top", "bits")

    def __init__(self) -> None:
        self.boot: int | None = None  # highest accepted boot; None until the first accept
        self.top = 0  # highest accepted seq under `boot`
        self.bits = 0

    def check(self, boot: int, seq: int) -> bool:
        """True if (boot, seq) has not been accepted and is not too old: fresh."""
        b = self.boot
        if boot != b:
            return b is None or boot > b
        d = self.top - seq
        if d < 0:
            return True
        return d < WINDOW and not (self.bits >> d) & 1

    def accept(self, boot: int, seq: int) -> None:
        """Record (boot, seq) as accepted.  Call it only for a pair `check` called
        fresh, after authentication; for any other pair it changes nothing."""
        b = self.boot
        if b is None or boot > b:
            self.boot = boot
            self.top = seq
            self.bits = 1
            return
        if boot < b:
            return
        d = seq - self.top
        if d > 0:
            bits = (self.bits << d) | 1 if d < WINDOW else 1
            if bits.bit_length() > _TRIM_BITS:
                bits &= _MASK
            self.bits = bits
            self.top = seq
        elif -d < WINDOW:
            self.bits |= 1 << -d

    # -- persistence --

    def snapshot(self) -> dict:
        """JSON-serialisable state: store it with the tracker's, in one transaction."""
        return {"v": SNAPSHOT_VERSION, "boot": self.boot, "top": self.top, "bits": format(self.bits & _MASK, "x")}

    @classmethod
    def restore(cls, snapshot: dict) -> ReplayWindow:
        """A window that answers exactly as the one `snapshot` was taken from.

        Raises ValueError (or TypeError, KeyError) for a snapshot that is not
        one: the caller decides what a damaged state means (see store.py).
        """
        if snapshot.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"replay window snapshot version {snapshot.get('v')!r} is not {SNAPSHOT_VERSION}")
        w = cls()
        boot, top, bits = snapshot["boot"], snapshot["top"], snapshot["bits"]
        if boot is None:
            return w
        if type(boot) is not int or type(top) is not int or type(bits) is not str:
            raise ValueError("replay window snapshot: boot and top must be integers, bits a hex string")
        if not (0 <= boot < 1 << 32 and 0 <= top < 1 << 32):
            raise ValueError("replay window snapshot: boot or top out of uint32 range")
        w.boot, w.top, w.bits = boot, top, int(bits, 16) & _MASK
        return w

    def __repr__(self) -> str:
        return f"ReplayWindow(boot={self.boot}, top={self.top}, seen={bin(self.bits & _MASK).count('1')})"
