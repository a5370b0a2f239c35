"""SGLs on the I/O fast path (emulator/nvme/fastpath.py; in C ``sgl_iovs`` of cbind/ioq.c).

The two shapes a Linux guest sends for its large requests (Base 2.1 §4.3.2, Figure 116):
SGL1 a Data Block descriptor, or SGL1 a Last Segment descriptor whose segment holds only
Data Block descriptors.  Everything else (Segment descriptors chaining segments, Bit
Bucket, Keyed and Transport descriptors, sub types other than Address, malformed
segments, lengths that do not add up to the transfer) is left to the normal path
(emulator/nvme/sgl.py), which walks it or gives its status.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.nvme.namespace import IOV_MAX  # pieces one preadv/pwritev takes
from emulator.nvme.sgl import DATA_BLOCK, LAST_SEGMENT, MAX_DESCRIPTORS, SGL_DESCRIPTOR

if TYPE_CHECKING:
    from emulator.nvme.fastpath import _Regions

# SGL Identifiers (byte 15: type 7:4, sub type 3:0 = 0h, address)
_DATA_BLOCK, _LAST_SEGMENT = DATA_BLOCK << 4, LAST_SEGMENT << 4
_ENTRIES = SGL_DESCRIPTOR.iter_unpack


def sgl_views(regions: "_Regions", addr: int, dw: int, length: int, to_host: bool, min_write: int,
              vs: list[memoryview]) -> bool:
    """Append to ``vs`` the views of a ``length``-byte transfer whose SGL1 is ``addr`` (bytes
    7:0) and ``dw`` (the PRP2 bytes: Length 11:8, SGL Identifier 15), as sgl_segments and
    MappedMemory.views would give them; False (``vs`` then unusable) for any other shape,
    anything sgl_segments would refuse, and memory outside the direct regions (a Read's
    data below ``min_write`` too)."""
    ident, n = dw >> 56, dw & 0xFFFF_FFFF  # bytes 14:12 reserved
    if ident == _DATA_BLOCK:
        return n == length and not (to_host and addr < min_write) and regions.views(addr, n, to_host, vs)
    count, rest = divmod(n, SGL_DESCRIPTOR.size)
    if ident != _LAST_SEGMENT or not n or rest or count >= MAX_DESCRIPTORS:
        return False  # Segment (a chain), Bit Bucket, Keyed, sub types; malformed segments
    raw = regions.ring(addr, n, False)  # the segment, read like a PRP list
    if raw is None:
        return False
    total = 0
    views = regions.views
    for a, k, d in _ENTRIES(raw):
        if d != _DATA_BLOCK:
            return False  # any other descriptor in a Last Segment: an error, or a Bit Bucket
        if k:  # a zero-length Data Block is skipped (its address unused), as in sgl.py
            total += k
            if (total > length or (to_host and a < min_write) or not views(a, k, to_host, vs)
                    or len(vs) > IOV_MAX):
                return False
    return total == length
