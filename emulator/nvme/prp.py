"""PRP (Physical Region Page) walking, Base 2.1 §4.1.1.

Turns PRP1/PRP2 of a command into (address, length) segments of guest memory,
merging physically contiguous pages.  Errors follow the spec's statuses:
bad offsets give PRP Offset Invalid; PRP lists outside mapped memory give a
Data Transfer Error (raised by the memory as DmaError and mapped by the caller).
"""
from __future__ import annotations

import struct

from emulator.memory import GuestMemory
from emulator.nvme.spec import Generic, generic

Segment = tuple[int, int]


def _append(segs: list[Segment], addr: int, length: int) -> None:
    if segs and segs[-1][0] + segs[-1][1] == addr:
        segs[-1] = (segs[-1][0], segs[-1][1] + length)
    else:
        segs.append((addr, length))


def prp_segments(memory: GuestMemory, prp1: int, prp2: int, length: int,
                 page_size: int) -> list[Segment]:
    if length <= 0:
        return []
    mask = page_size - 1
    # §4.1.1: the first PRP entry's offset must be dword aligned.
    if prp1 & 0x3:
        raise generic(Generic.PRP_OFFSET_INVALID, "PRP1 offset not dword aligned")
    first = min(length, page_size - (prp1 & mask))
    segs: list[Segment] = [(prp1, first)]
    remaining = length - first
    if remaining == 0:
        return segs
    if remaining <= page_size:
        # PRP2 is the address of the second (and last) memory page.
        if prp2 & mask:
            raise generic(Generic.PRP_OFFSET_INVALID, "PRP2 entry has an offset")
        _append(segs, prp2, remaining)
        return segs
    # PRP2 points to a PRP list (qword aligned, may start inside a page).
    if prp2 & 0x7:
        raise generic(Generic.PRP_OFFSET_INVALID, "PRP list pointer not qword aligned")
    list_addr = prp2
    npages = (remaining + mask) // page_size
    while npages:
        slots = (page_size - (list_addr & mask)) // 8
        take = npages if npages <= slots else slots - 1  # last slot chains to the next list
        raw = memory.read(list_addr, (take + (1 if take < npages else 0)) * 8)
        entries = struct.unpack_from(f"<{len(raw) // 8}Q", raw)
        for i in range(take):
            e = entries[i]
            if e & mask:
                raise generic(Generic.PRP_OFFSET_INVALID, "PRP list entry has an offset")
            n = min(page_size, remaining)
            _append(segs, e, n)
            remaining -= n
        npages -= take
        if npages:
            nxt = entries[take]
            if nxt & 0x7:
                raise generic(Generic.PRP_OFFSET_INVALID, "chained PRP list pointer not aligned")
            list_addr = nxt
    return segs
