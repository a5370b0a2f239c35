"""An interval map of guest-memory regions, each optionally backed by an mmap.

Regions come from vfio-user DMA_MAP (fd + offset) or from a test host that
registers its own memfd.  Each region gets its own mapping (QEMU sends a
fresh dup of the same memfd for every map; Python's mmap keeps a dup of the
fd per mapping).

Unmapping follows VFIO type1: a range removes every region inside it, and a
region it only partly covers is cut to what lies outside (the pieces share the
mapping).  So after an unmap nothing in the range can be reached, whatever the
client mapped there before; a map over an existing region is refused, the
caller keeps the old one (vfio-user §3.1: EEXIST).
"""
from __future__ import annotations

import bisect
import mmap
import os
from dataclasses import dataclass, field

from emulator.memory.guest_memory import DmaError, WriteObserver


@dataclass
class Region:
    iova: int
    size: int
    writable: bool
    fd_offset: int = 0
    # None for a region that came without an fd: it exists but cannot be reached.
    mem: memoryview | None = None
    _mmap: mmap.mmap | None = field(default=None, repr=False)
    # regions cut from one DMA_MAP share its mmap: [users], closed when the last goes
    _users: list[int] = field(default_factory=lambda: [1], repr=False)

    @property
    def end(self) -> int:
        return self.iova + self.size


class MappedMemory:
    """GuestMemory over a sorted list of non-overlapping regions."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[Region] = []
        self.observers: list[WriteObserver] = []

    # -- map management -------------------------------------------------
    def add(self, iova: int, size: int, fd: int | None, fd_offset: int = 0,
            writable: bool = True) -> Region:
        """Map [iova, iova+size).  The caller keeps ownership of ``fd``.

        Raises FileExistsError on overlap, ValueError on a bad size, OSError
        if the fd cannot be mapped.
        """
        if size <= 0 or iova < 0 or iova + size > 1 << 64:
            raise ValueError("bad region")
        i = bisect.bisect_right(self._starts, iova)
        if i > 0 and self._regions[i - 1].end > iova:
            raise FileExistsError("overlaps an existing region")
        if i < len(self._regions) and self._regions[i].iova < iova + size:
            raise FileExistsError("overlaps an existing region")
        region = Region(iova, size, writable, fd_offset)
        if fd is not None:
            # mmap offsets must be page (or huge page) aligned: map the
            # enclosing aligned window and index into it.
            try:
                align = max(mmap.ALLOCATIONGRANULARITY, os.fstat(fd).st_blksize)
            except OSError:
                align = mmap.ALLOCATIONGRANULARITY
            base = fd_offset - fd_offset % align
            skip = fd_offset - base
            length = skip + size
            length += (-length) % align
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            m = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=base)
            region._mmap = m
            region.mem = memoryview(m)[skip:skip + size]
        self._starts.insert(i, iova)
        self._regions.insert(i, region)
        return region

    def remove(self, iova: int, size: int) -> bool:
        """Unmap [iova, iova+size): regions inside go, regions partly inside are cut.

        False if nothing was mapped there."""
        end = iova + size
        i = max(0, bisect.bisect_right(self._starts, iova) - 1)
        hit = False
        while i < len(self._regions) and self._regions[i].iova < end:
            r = self._regions[i]
            if r.end <= iova:
                i += 1
                continue
            hit = True
            keep = [piece for piece in (self._cut(r, r.iova, iova), self._cut(r, end, r.end)) if piece]
            self._release(r)
            self._regions[i:i + 1] = keep
            self._starts[i:i + 1] = [k.iova for k in keep]
            i += len(keep)
        return hit

    @staticmethod
    def _cut(r: Region, start: int, stop: int) -> Region | None:
        """The part [start, stop) of ``r`` as a region sharing its mapping (None if empty)."""
        if stop <= start:
            return None
        off = start - r.iova
        piece = Region(start, stop - start, r.writable, r.fd_offset + off)
        if r.mem is not None:
            piece.mem = r.mem[off:off + piece.size]
            piece._mmap = r._mmap
            piece._users = r._users
            r._users[0] += 1
        return piece

    def clear(self) -> None:
        for r in self._regions:
            self._release(r)
        self._starts.clear()
        self._regions.clear()

    @staticmethod
    def _release(r: Region) -> None:
        if r.mem is not None:
            r.mem.release()
            r.mem = None
        r._users[0] -= 1
        if r._mmap is not None and r._users[0] <= 0:
            try:
                r._mmap.close()
            except BufferError:
                # A view is still alive somewhere (e.g. an in-flight DMA);
                # the mapping goes away when the last view does.
                pass
            r._mmap = None

    def regions(self) -> list[Region]:
        return list(self._regions)

    def reachable(self, addr: int, length: int, write: bool = False) -> bool:
        """True if the device can access [addr, addr+length) (and store into it with ``write``)."""
        try:
            self._span(addr, length, write)
        except DmaError:
            return False
        return True

    # -- access ---------------------------------------------------------
    def views(self, addr: int, length: int, write: bool = False) -> list[memoryview]:
        out = self._span(addr, length, write)
        if write and self.observers and out:
            for obs in self.observers:
                obs(addr, length)
        return out

    def _span(self, addr: int, length: int, write: bool) -> list[memoryview]:
        if length < 0 or addr < 0:
            raise DmaError(addr, length, "bad range")
        out: list[memoryview] = []
        if length == 0:
            return out
        pos, remaining = addr, length
        i = bisect.bisect_right(self._starts, pos) - 1
        while remaining:
            if i < 0 or i >= len(self._regions):
                raise DmaError(addr, length, "outside mapped memory")
            r = self._regions[i]
            if not (r.iova <= pos < r.end):
                raise DmaError(addr, length, "outside mapped memory")
            if r.mem is None:
                raise DmaError(addr, length, "into a region without an fd")
            if write and not r.writable:
                raise DmaError(addr, length, "write into read-only memory")
            off = pos - r.iova
            n = min(remaining, r.size - off)
            out.append(r.mem[off:off + n])
            pos += n
            remaining -= n
            i += 1
        return out

    def read(self, addr: int, length: int) -> bytes:
        vs = self.views(addr, length)
        if len(vs) == 1:
            return bytes(vs[0])
        return b"".join(bytes(v) for v in vs)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        pos = 0
        for v in self.views(addr, len(mv), write=True):
            n = len(v)
            v[:] = mv[pos:pos + n]
            pos += n

    store_now = write
