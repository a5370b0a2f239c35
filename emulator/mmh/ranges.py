"""LBA ranges as (SLBA, NLB) pairs: coalesce, split, size."""
from __future__ import annotations

from typing import Iterable

Range = tuple[int, int]


def coalesce(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, merged (overlapping or adjacent) ranges."""
    out: list[Range] = []
    for slba, nlb in sorted(r for r in ranges if r[1] > 0):
        if out and slba <= out[-1][0] + out[-1][1]:
            last = out[-1]
            out[-1] = (last[0], max(last[0] + last[1], slba + nlb) - last[0])
        else:
            out.append((slba, nlb))
    return out


def split(ranges: Iterable[Range], max_nlb: int) -> list[Range]:
    """Pieces of at most ``max_nlb`` LBAs."""
    out: list[Range] = []
    for slba, nlb in ranges:
        while nlb > 0:
            n = min(nlb, max_nlb)
            out.append((slba, n))
            slba, nlb = slba + n, nlb - n
    return out


def total(ranges: Iterable[Range]) -> int:
    return sum(n for _, n in ranges)


def subtract(ranges: Iterable[Range], cut: Iterable[Range]) -> list[Range]:
    """The parts of ``ranges`` outside ``cut`` (both coalesced first)."""
    out: list[Range] = []
    cuts = coalesce(cut)
    for slba, nlb in coalesce(ranges):
        start, end = slba, slba + nlb
        for cs, cn in cuts:
            ce = cs + cn
            if ce <= start or cs >= end:
                continue
            if cs > start:
                out.append((start, cs - start))
            start = max(start, ce)
            if start >= end:
                break
        if start < end:
            out.append((start, end - start))
    return out


class ChangeSet:
    """Logged changes in queue order: the blocks last written (copy them) and the blocks
    last deallocated (deallocate them on the destination)."""

    def __init__(self) -> None:
        self.written: list[Range] = []
        self.deallocated: list[Range] = []

    def write(self, r: Range) -> None:
        self.deallocated = subtract(self.deallocated, [r])
        self.written.append(r)

    def deallocate(self, r: Range) -> None:
        self.written = subtract(self.written, [r])
        self.deallocated = coalesce(self.deallocated + [r])
