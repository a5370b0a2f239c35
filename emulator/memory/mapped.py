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

Fault safety: a client (or anyone holding the file) may shrink a mapped file,
and a load or store past its new end raises SIGBUS, which would kill the
process.  A region whose fd is a memfd sealed against shrinking
(F_SEAL_SHRINK, what QEMU's memory-backend-memfd does by default) cannot lose
pages, and is read and written directly.  Any other region is *guarded*:
:meth:`MappedMemory.read` and :meth:`MappedMemory.write` copy through the
kernel (``emulator.memory.safecopy``), so a lost page is a :class:`DmaError` (a Data
Transfer Error for the command) instead of a crash.  The views handed out by
:meth:`MappedMemory.views` are for system calls (preadv/pwritev), which meet a
lost page with EFAULT; Python code must not load or store through them.
"""
from __future__ import annotations

import bisect
import fcntl
import mmap
import os
import sys
from dataclasses import dataclass, field

from emulator.memory import safecopy
from emulator.memory.guest_memory import UNMAPPED, DmaError, WriteObserver


# Python 3.13+ can map without keeping its own dup of the fd (one fd less per region).
_NO_FD_COPY: dict[str, bool] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def sealed_against_shrink(fd: int) -> bool:
    """True if nobody can make ``fd``'s file smaller (a memfd with F_SEAL_SHRINK)."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:  # not a memfd (EINVAL): any holder may truncate it
        return False


MAX_HOLES = 256  # unmapped ranges remembered (QEMU's remaps leave a few at a time)


@dataclass
class Region:
    iova: int
    size: int
    writable: bool
    fd_offset: int = 0
    # None for a region that came without an fd: it exists but cannot be reached.
    mem: memoryview | None = None
    # True when the file may shrink under the mapping: copies go through the kernel.
    guarded: bool = False
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
        # ranges the client unmapped and has not mapped again: [start, end)
        self._holes: list[tuple[int, int]] = []
        # bumped by every change of the region list: a fast path that cached host
        # addresses of the regions (emulator/nvme/fastpath.py) rebuilds its table
        self.generation = 0

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
            m = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=base, **_NO_FD_COPY)
            region._mmap = m
            region.mem = memoryview(m)[skip:skip + size]
            region.guarded = not sealed_against_shrink(fd)
        self._starts.insert(i, iova)
        self._regions.insert(i, region)
        self._fill_holes(iova, iova + size)
        self.generation += 1
        return region

    def _fill_holes(self, start: int, end: int) -> None:
        keep: list[tuple[int, int]] = []
        for a, b in self._holes:
            keep += [(x, y) for x, y in ((a, min(b, start)), (max(a, end), b)) if x < y]
        self._holes = keep

    def _why_unmapped(self, pos: int) -> str:
        return UNMAPPED if any(a <= pos < b for a, b in self._holes) else "outside mapped memory"

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
        if hit:
            self.generation += 1
            self._fill_holes(iova, end)
            self._holes.append((iova, end))
            del self._holes[:-MAX_HOLES]
        return hit

    @staticmethod
    def _cut(r: Region, start: int, stop: int) -> Region | None:
        """The part [start, stop) of ``r`` as a region sharing its mapping (None if empty)."""
        if stop <= start:
            return None
        off = start - r.iova
        piece = Region(start, stop - start, r.writable, r.fd_offset + off, guarded=r.guarded)
        if r.mem is not None:
            piece.mem = r.mem[off:off + piece.size]
            piece._mmap = r._mmap
            piece._users = r._users
            r._users[0] += 1
        return piece

    def clear(self) -> None:
        self.generation += 1
        self._holes.clear()
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

    def direct(self) -> tuple["MappedMemory", int] | None:
        """For a device fast path: the memory it may load from and store into itself
        (through the regions' host mappings), and the lowest address it may store to
        that way.  None while every access must go through :meth:`views` and friends
        (write observers registered: they must see each device write)."""
        return None if self.observers else (self, 0)


    # -- access ---------------------------------------------------------
    def _pieces(self, addr: int, length: int, write: bool) -> list[tuple[Region, int, int]]:
        """(region, offset in it, length) covering [addr, addr+length), or DmaError."""
        if length < 0 or addr < 0:
            raise DmaError(addr, length, "bad range")
        out: list[tuple[Region, int, int]] = []
        pos, remaining = addr, length
        i = bisect.bisect_right(self._starts, pos) - 1
        while remaining:
            if i < 0 or i >= len(self._regions):
                raise DmaError(addr, length, self._why_unmapped(pos))
            r = self._regions[i]
            if not (r.iova <= pos < r.end):
                raise DmaError(addr, length, self._why_unmapped(pos))
            if r.mem is None:
                raise DmaError(addr, length, "into a region without an fd")
            if write and not r.writable:
                raise DmaError(addr, length, "write into read-only memory")
            off = pos - r.iova
            n = min(remaining, r.size - off)
            out.append((r, off, n))
            pos += n
            remaining -= n
            i += 1
        if write and self.observers:
            for obs in self.observers:
                obs(addr, length)
        return out

    def views(self, addr: int, length: int, write: bool = False) -> list[memoryview]:
        return [r.mem[off:off + n] for r, off, n in self._pieces(addr, length, write)]  # type: ignore[index]

    def read(self, addr: int, length: int) -> bytes:
        out = []
        for r, off, n in self._pieces(addr, length, False):
            v = r.mem[off:off + n]  # type: ignore[index]
            if r.guarded:
                got = safecopy.read(v)
                if got is None:
                    raise DmaError(addr, length, "beyond the end of the mapped file")
                out.append(got)
            else:
                out.append(bytes(v))
        return out[0] if len(out) == 1 else b"".join(out)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        pos = 0
        for r, off, n in self._pieces(addr, len(mv), True):
            v = r.mem[off:off + n]  # type: ignore[index]
            if r.guarded:
                if not safecopy.write(v, mv[pos:pos + n]):
                    raise DmaError(addr, len(mv), "beyond the end of the mapped file")
            else:
                v[:] = mv[pos:pos + n]
            pos += n

    store_now = write
