"""PRP (Physical Region Page) walking, Base 2.1 §4.1.1.

Turns PRP1/PRP2 of a command into (address, length) segments of guest memory,
merging physically contiguous pages.  Errors follow the spec's statuses:
bad offsets give PRP Offset Invalid; PRP lists outside mapped memory give a
Data Transfer Error (raised by the memory as DmaError and mapped by the caller).

The walk over PRP list pages and the guest-memory reads stay here; the loop
over the entries of each list page chunk is ``cbind.prp.merge_entries`` (C
when it compiled, else the pure-Python loop, with the same results).
"""
from __future__ import annotations

import struct

from cbind.prp import MergeFn, Segment, append_segment, merge_entries
from emulator.memory import GuestMemory
from emulator.nvme.spec import Generic, generic

__all__ = ["Segment", "prp_segments"]

_QWORD = struct.Struct("<Q")


def prp_segments(memory: GuestMemory, prp1: int, prp2: int, length: int,
                 page_size: int, merge: MergeFn = merge_entries) -> list[Segment]:
    """Segments of the data buffer; ``merge`` is the list-entry loop (tests pass either)."""
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
        append_segment(segs, prp2, remaining)
        return segs
    # PRP2 points to a PRP list (qword aligned, may start inside a page).
    if prp2 & 0x7:
        raise generic(Generic.PRP_OFFSET_INVALID, "PRP list pointer not qword aligned")
    list_addr = prp2
    npages = (remaining + mask) // page_size
    # A list page that holds only a chain pointer makes no progress; a chain of
    # them pointing back at itself would loop for ever.  A well-formed list
    # needs at most npages hops, so more than that is a malformed list.
    hops = npages + 1
    while npages:
        hops -= 1
        if hops < 0:
            raise generic(Generic.PRP_OFFSET_INVALID, "PRP list chain does not advance")
        slots = (page_size - (list_addr & mask)) // 8
        take = npages if npages <= slots else slots - 1  # last slot chains to the next list
        chained = take < npages
        raw = memory.read(list_addr, (take + chained) * 8)
        if merge(raw, take, page_size, remaining, segs) >= 0:
            raise generic(Generic.PRP_OFFSET_INVALID, "PRP list entry has an offset")
        remaining -= min(remaining, take * page_size)
        npages -= take
        if chained:
            nxt = _QWORD.unpack_from(raw, take * 8)[0]
            if nxt & 0x7:
                raise generic(Generic.PRP_OFFSET_INVALID, "chained PRP list pointer not aligned")
            list_addr = nxt
    return segs
