"""What the central side has taken from a gateway, as merged key ranges. Pure: no SQL.

Payload 3 (docs/PROTOCOL.md "Uplink") names every block of readings by its
place in the gateway's ingest log: the row's id, the offset of its first
datagram in the row, and whether it runs to the row's end.  A block is the key
range

    lo = id << OFFSET_BITS | offset
    hi = id << OFFSET_BITS | (OFFSET_MASK if last else offset + datagrams - 1)

so a whole row is [id << 20, id << 20 | 0xFFFFF], consecutive rows make one
range, and the pieces of a row cut in several messages join into the row's
range once all have arrived.  The central database keeps, per (gateway,
database identity), the merged ranges taken (`uplink_ranges`): one range while
a gateway's rows arrive in order, plus one per hole still open (rows published
out of order, or rows the gateway lost before sending them until it says so).
A block already covered is a replay and adds nothing; one partly covered
(pieces cut differently on a retry) gives up only the datagrams not covered.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

OFFSET_BITS = 20
OFFSET_MASK = (1 << OFFSET_BITS) - 1
MAX_ROW_ID = (1 << (63 - OFFSET_BITS)) - 1  # keys stay SQLite integers (int64)
MAX_OFFSET = OFFSET_MASK  # datagrams of one ingest-log row at most (a flush writes far fewer)


def block_range(row_id: int, offset: int, datagrams: int, last: bool) -> tuple[int, int]:
    """The key range of a block: ValueError when it cannot be one."""
    if not (1 <= row_id <= MAX_ROW_ID and 0 <= offset and datagrams >= 1 and offset + datagrams - 1 <= MAX_OFFSET):
        raise ValueError(f"block id {row_id}, offset {offset}, {datagrams} datagrams out of range")
    base = row_id << OFFSET_BITS
    return base | offset, base | (OFFSET_MASK if last else offset + datagrams - 1)


def rows_range(first_id: int, last_id: int) -> tuple[int, int]:
    """The key range of whole rows first_id..last_id (rows the gateway says are gone)."""
    if not 1 <= first_id <= last_id <= MAX_ROW_ID:
        raise ValueError(f"rows {first_id}-{last_id} out of range")
    return first_id << OFFSET_BITS, (last_id << OFFSET_BITS) | OFFSET_MASK


class Ranges:
    """Disjoint, non-adjacent, sorted [lo, hi] ranges of integer keys (inclusive)."""

    __slots__ = ("los", "his")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self.los: list[int] = []
        self.his: list[int] = []
        for lo, hi in sorted(ranges):
            self.add(lo, hi)

    def __len__(self) -> int:
        return len(self.los)

    def items(self) -> list[tuple[int, int]]:
        return list(zip(self.los, self.his))

    def copy(self) -> Ranges:
        out = Ranges()
        out.los, out.his = self.los[:], self.his[:]
        return out

    def uncovered(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The parts of [lo, hi] not covered, in order ([(lo, hi)] when none is)."""
        if lo > hi:
            raise ValueError("lo > hi")
        los, his = self.los, self.his
        i = bisect_right(los, lo) - 1  # the range starting at or before lo, if any
        if i < 0:
            i = 0
        out = []
        at = lo
        while i < len(los) and los[i] <= hi:
            if his[i] >= at:
                if los[i] > at:
                    out.append((at, los[i] - 1))
                at = his[i] + 1
                if at > hi:
                    return out
            i += 1
        out.append((at, hi))
        return out

    def add(self, lo: int, hi: int) -> None:
        """Cover [lo, hi], merging with every range it overlaps or touches."""
        if lo > hi:
            raise ValueError("lo > hi")
        los, his = self.los, self.his
        # first range that could touch: its hi >= lo - 1
        i = bisect_right(los, lo) - 1
        if i < 0 or his[i] < lo - 1:
            i += 1
        j = i
        while j < len(los) and los[j] <= hi + 1:
            j += 1
        if i < j:
            lo = min(lo, los[i])
            hi = max(hi, his[j - 1])
        los[i:j] = [lo]
        his[i:j] = [hi]
