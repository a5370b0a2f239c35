"""LBA allocation tracking at TLBAAG granularity (NVM CS 1.2, TP4165).

One bit per Tracked LBA Allocation Granularity granule (bit g lives in byte
g >> 3, bit g & 7; equivalently in little-endian 64-bit word g >> 6, bit
g & 63).  The array lives in process memory and is written through to a
sidecar file ``<backing>.alloc``: every update that changes a word is
``pwrite``n at once, so it is in the kernel's page cache the moment it is
made and a process killed without a flush loses nothing.  Flush (and close)
fdatasync the sidecar, like the data file, so a crash of the whole machine
loses at most what the host had not flushed: the Volatile Write Cache rule
(Base 2.1 §5.27.1.4) covers the bitmap exactly as it covers data.

The sidecar is not memory-mapped on purpose: a store into a mapped page that
the file system cannot back (disk full) or that someone truncated away is a
SIGBUS, which kills the process.  Its blocks are reserved (``fallocate``)
when it is created, so a full file system cannot refuse a bitmap update; a
write-through that still fails is logged and the whole bitmap is rewritten
at the next save.  The sidecar is opened with O_NOFOLLOW and created 0600.

At open the sidecar is reconciled with the backing file's data extents
(SEEK_DATA / SEEK_HOLE):

* no valid sidecar (first open, or TLBAAG/size changed): every granule that
  holds file data is marked allocated;
* a valid sidecar: a granule whose bit is clear but which holds *nonzero*
  bytes in the file was written after the sidecar last reached the disk
  (machine crash), so its bit is set.  Clear granules inside data extents
  that read as zeroes stay clear: they are deallocations narrower than a
  file-system block, or hole punches the file system refused (and
  ``cbind.fileops`` wrote zeroes instead); reads return zeroes either way.

Rules (NVM CS 1.2 §4.2.1, ATYPE 02h, and §5.2.2 Get LBA Status capability):

* a granule's bit is set by any command that writes one of its LBAs (Write,
  Write Zeroes without DEAC, ...);
* it is cleared only when a deallocation covers the whole granule (the last,
  short granule counts as covered when the deallocation reaches NSZE).

Scans are word-wise: find the nonzero 64-bit words with numpy, then expand
only the run *edges* inside them, so a scan costs one pass over the bitmap
plus work proportional to the number of runs (not of allocated granules).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

log = logging.getLogger("nvme.alloc")

# Sidecar: a 24-byte header, then the bitmap padded to whole 64-bit words
# (24 is a multiple of 8, so the words stay aligned inside the mapping).
_HEADER = struct.Struct("<8sQII")  # magic, nsze, tlbaag, lba_size
_MAGIC = b"NVMEALC2"
SIDECAR_WORDS_OFFSET = _HEADER.size  # byte offset of bitmap word 0 in the sidecar
_WORD = np.dtype("<u8")
_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_SCAN_FIRST_WORDS = 1 << 10  # first scan chunk: 64 Ki granules
_SCAN_MAX_WORDS = 1 << 19  # chunks double up to 32 Mi granules (4 MiB of bitmap)
_READ_CHUNK = 1 << 20  # bytes read at a time when checking granules at open
_EXTENT_SLACK = 1 << 20  # SEEK_DATA may over-report by this much and still be trusted
_EMPTY_RUNS = np.zeros((0, 2), dtype=np.int64)
_MAX_RUN_WRITES = 4096  # write-through calls per update before one write covers the span
_WRITE_GAP_WORDS = 512  # unchanged words (4 KiB) rewritten rather than starting another write


def bitmap_words(granules: int) -> int:
    """64-bit words needed for ``granules`` bits."""
    return (granules + 63) >> 6


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, end) byte ranges of ``fd`` below ``size`` that SEEK_DATA calls data."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            yield start, end
        pos = max(end, start + 1)


def _bit_positions(word_index: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Granule numbers of the set bits of ``masks`` (word k is word ``word_index[k]``), ascending."""
    nz = np.flatnonzero(masks != 0)
    if nz.size == 0:
        return np.zeros(0, dtype=np.int64)
    sel = np.ascontiguousarray(masks[nz], dtype=_WORD)
    bits = np.unpackbits(sel.view(np.uint8), bitorder="little")
    flat = np.flatnonzero(bits != 0)
    return word_index[nz][flat >> 6].astype(np.int64) * 64 + (flat & 63)


def _any_nonzero(fd: int, lo: int, hi: int) -> bool:
    while lo < hi:
        data = os.pread(fd, min(_READ_CHUNK, hi - lo), lo)
        if not data:
            return False
        if np.frombuffer(data, dtype=np.uint8).any():
            return True
        lo += len(data)
    return False


class AllocationMap:
    def __init__(self, nsze: int, tlbaag: int, bits: np.ndarray,
                 sidecar: Path | None = None, sidecar_fd: int = -1) -> None:
        if tlbaag < 1:
            raise ValueError(f"TLBAAG must be >= 1, not {tlbaag}")
        self.nsze = nsze
        self.tlbaag = tlbaag
        self.granules = (nsze + tlbaag - 1) // tlbaag
        if bits.nbytes != bitmap_words(self.granules) * 8:
            raise ValueError("bitmap size does not match the namespace")
        self.bits = bits  # uint8, packed little-endian bit order
        self.words = bits.view(np.ndarray).view(_WORD)  # the same memory as 64-bit words
        self.sidecar = sidecar
        self.sidecar_fd = sidecar_fd  # -1: not persisted
        self.dirty = False  # written through since the last save
        self.stale = False  # a write-through failed: save() rewrites everything

    # -- construction ----------------------------------------------------
    @classmethod
    def in_memory(cls, nsze: int, tlbaag: int) -> "AllocationMap":
        granules = (nsze + tlbaag - 1) // tlbaag
        return cls(nsze, tlbaag, np.zeros(bitmap_words(granules) * 8, dtype=np.uint8))

    @classmethod
    def open(cls, data_path: Path, nsze: int, tlbaag: int, data_fd: int,
             lba_size: int) -> "AllocationMap":
        """The map of the namespace stored in ``data_path`` (open as ``data_fd``)."""
        sidecar = Path(str(data_path) + ".alloc")
        granules = (nsze + tlbaag - 1) // tlbaag
        nbytes = bitmap_words(granules) * 8
        header = _HEADER.pack(_MAGIC, nsze, tlbaag, lba_size)
        fd = os.open(sidecar, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.fchmod(fd, 0o600)  # like the image it describes
            valid = (st.st_size == _HEADER.size + nbytes
                     and os.pread(fd, _HEADER.size, 0) == header)
            bits = np.zeros(nbytes, dtype=np.uint8)
            if valid:
                _read_exactly(fd, memoryview(bits), _HEADER.size)
            else:
                os.ftruncate(fd, 0)
                os.pwrite(fd, header, 0)
                os.ftruncate(fd, _HEADER.size + nbytes)
            # reserve the bitmap's blocks: a full disk must not refuse an update later
            os.posix_fallocate(fd, 0, _HEADER.size + nbytes)
            amap = cls(nsze, tlbaag, bits, sidecar, fd)
        except BaseException:
            os.close(fd)
            raise
        amap.reconcile(data_fd, lba_size, sidecar_valid=valid)
        amap.save()
        return amap

    def reconcile(self, fd: int, lba_size: int, sidecar_valid: bool) -> None:
        """Bring the bits up to date with the data in the backing file (see the module text)."""
        size = self.nsze * lba_size
        extents = list(data_extents(fd, size))
        if not extents:
            return
        reported = sum(e - s for s, e in extents)
        stored = os.fstat(fd).st_blocks * 512
        # A file system without SEEK_DATA support reports the whole file as data.
        trusted = reported <= stored + _EXTENT_SLACK
        if not trusted:
            log.warning("%s: SEEK_DATA reports %d bytes of data but %d are stored; %s",
                        self.sidecar, reported, stored,
                        "keeping the sidecar bitmap" if sidecar_valid
                        else "marking every reported extent allocated")
        if not sidecar_valid:
            for start, end in extents:
                self.mark_allocated(start // lba_size, -(-end // lba_size) - start // lba_size)
            return
        if not trusted:
            return
        # Fast path: an extent inside one granule whose bit is set needs no reading.
        ext = np.array(extents, dtype=np.int64)
        gbytes = self.tlbaag * lba_size
        g0, g1 = ext[:, 0] // gbytes, -(-ext[:, 1] // gbytes)
        bit = (self.words[g0 >> 6] >> (g0 & 63).astype(np.uint64)) & np.uint64(1)
        for start, end in ext[~((g1 - g0 == 1) & (bit == 1))].tolist():
            self._recover_written(fd, lba_size, start, end)

    def _recover_written(self, fd: int, lba_size: int, start: int, end: int) -> None:
        """Set the clear granules of data extent [start, end) that hold nonzero bytes."""
        gbytes = self.tlbaag * lba_size
        g0, g1 = start // gbytes, -(-end // gbytes)
        for clear in self._clear_granule_batches(g0, g1):
            # Group consecutive clear granules, each group at most _READ_CHUNK bytes.
            breaks = np.flatnonzero(np.diff(clear) != 1) + 1
            for group in np.split(clear, breaks):
                per = max(1, _READ_CHUNK // gbytes)
                for i in range(0, len(group), per):
                    a, b = int(group[i]), int(group[min(i + per, len(group)) - 1]) + 1
                    self._set_if_nonzero(fd, gbytes, a, b, start, end)

    def _clear_granule_batches(self, g0: int, g1: int) -> Iterator[np.ndarray]:
        """Granule numbers in [g0, g1) whose bit is clear, in ascending batches."""
        g1 = min(g1, self.granules)
        if g1 <= g0:
            return
        w_first, w_last = g0 >> 6, (g1 - 1) >> 6
        for wa in range(w_first, w_last + 1, _SCAN_MAX_WORDS):
            wb = min(w_last + 1, wa + _SCAN_MAX_WORDS)
            inv = ~self.words[wa:wb]
            if wa == w_first:
                inv[0] &= _ONES << np.uint64(g0 & 63)
            if wb - 1 == w_last:
                inv[-1] &= _ONES >> np.uint64(63 - ((g1 - 1) & 63))
            pos = _bit_positions(np.arange(wa, wb, dtype=np.int64), inv)
            if pos.size:
                yield pos

    def _set_if_nonzero(self, fd: int, gbytes: int, a: int, b: int, lo: int, hi: int) -> None:
        """Set granules a..b-1 that hold a nonzero byte within file bytes [lo, hi)."""
        if gbytes > _READ_CHUNK:  # big granules: one at a time, up to the first nonzero byte
            for g in range(a, b):
                if _any_nonzero(fd, max(lo, g * gbytes), min(hi, (g + 1) * gbytes)):
                    self._set_range(g, g + 1, True)
            return
        base = a * gbytes  # a..b-1 span at most _READ_CHUNK bytes: one read
        rlo, rhi = max(lo, base), min(hi, b * gbytes)
        nz = np.flatnonzero(np.frombuffer(os.pread(fd, rhi - rlo, rlo), dtype=np.uint8))
        for k in np.unique((rlo - base + nz) // gbytes).tolist():
            self._set_range(a + k, a + k + 1, True)

    # -- updates -----------------------------------------------------------
    def mark_allocated(self, slba: int, nlb: int) -> None:
        """A write touched [slba, slba+nlb): every granule it touches is allocated."""
        if nlb <= 0:
            return
        g0 = slba // self.tlbaag
        g1 = (slba + nlb - 1) // self.tlbaag
        self._set_range(g0, g1 + 1, True)

    def mark_deallocated(self, slba: int, nlb: int) -> None:
        """[slba, slba+nlb) was deallocated: clear the granules it covers entirely."""
        if nlb <= 0:
            return
        end = slba + nlb
        g0 = -(-slba // self.tlbaag)
        g1 = self.granules if end >= self.nsze else end // self.tlbaag
        if g1 > g0:
            self._set_range(g0, g1, False)

    def _set_range(self, g0: int, g1: int, value: bool) -> None:
        """Set or clear bits [g0, g1)."""
        g1 = min(g1, self.granules)
        if g1 <= g0:
            return
        w0, w1 = g0 >> 6, (g1 - 1) >> 6
        first = _ONES << np.uint64(g0 & 63)
        last = _ONES >> np.uint64(63 - ((g1 - 1) & 63))
        words = self.words
        if w0 == w1:
            mask = first & last
            old = words[w0]
            words[w0] = (old | mask) if value else (old & ~mask)
            if words[w0] != old:
                self._write_through(w0, w0 + 1)
            return
        if value:
            words[w0] |= first
            words[w1] |= last
        else:
            words[w0] &= ~first
            words[w1] &= ~last
        self._write_through(w0, w0 + 1)
        self._write_through(w1, w1 + 1)
        # Inner words: only those that change are stored and written through (deallocating a
        # terabyte with a few scattered allocated granules touches a few words, not 32 MiB).
        inner = words[w0 + 1:w1]
        changed = np.flatnonzero(inner != _ONES) if value else np.flatnonzero(inner)
        if not changed.size:
            return
        inner[changed] = _ONES if value else 0
        # one write per group of changed words less than a page apart
        breaks = np.flatnonzero(np.diff(changed) > _WRITE_GAP_WORDS) + 1
        if breaks.size > _MAX_RUN_WRITES:  # very scattered: one write over the span
            self._write_through(w0 + 1 + int(changed[0]), w0 + 2 + int(changed[-1]))
            return
        for run in np.split(changed, breaks):
            self._write_through(w0 + 1 + int(run[0]), w0 + 2 + int(run[-1]))

    def _write_through(self, w0: int, w1: int) -> None:
        """Store words [w0, w1) into the sidecar (its page cache: a killed process loses nothing)."""
        if self.sidecar_fd < 0:
            return
        self.dirty = True
        try:
            _write_exactly(self.sidecar_fd, memoryview(self.words[w0:w1]).cast("B"), SIDECAR_WORDS_OFFSET + w0 * 8)
        except OSError as e:
            if not self.stale:
                log.error("%s: bitmap update not stored (%s); rewriting it at the next flush", self.sidecar, e)
            self.stale = True

    # -- queries -----------------------------------------------------------
    def is_allocated(self, granule: int) -> bool:
        return bool((int(self.words[granule >> 6]) >> (granule & 63)) & 1)

    def allocated_granules(self) -> int:
        return int(np.bitwise_count(self.words).sum(dtype=np.int64))

    def allocated_lbas(self) -> int:
        """LBAs in allocated granules (the short last granule counts its real size): NUSE."""
        n = self.allocated_granules() * self.tlbaag
        tail = self.granules * self.tlbaag - self.nsze
        if tail and self.granules and self.is_allocated(self.granules - 1):
            n -= tail
        return n

    @property
    def memory_bytes(self) -> int:
        """Size of the bitmap: one bit per granule, padded to a 64-bit word."""
        return int(self.bits.nbytes)

    def runs(self, g_start: int, g_end: int,
             max_runs: int | None = None) -> tuple[np.ndarray, bool]:
        """Allocated granule runs within [g_start, g_end), clipped to it.

        Returns an (n, 2) int64 array of [start, end) in ascending order and
        ``more``: True when ``max_runs`` cut the list short and another run
        follows the last one returned.  The scan stops as soon as it knows,
        so a host walking a namespace with continuation reads each part of
        the bitmap about once.
        """
        g_start, g_end = max(g_start, 0), min(g_end, self.granules)
        if g_end <= g_start:
            return _EMPTY_RUNS, False
        words = self.words
        w_first, w_last = g_start >> 6, (g_end - 1) >> 6
        lo_mask = _ONES << np.uint64(g_start & 63)
        hi_mask = _ONES >> np.uint64(63 - ((g_end - 1) & 63))
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        n_starts = n_ends = 0
        wa, step = w_first, _SCAN_FIRST_WORDS
        while wa <= w_last:
            wb = min(w_last + 1, wa + step)
            step = min(step * 2, _SCAN_MAX_WORDS)
            seg = words[wa:wb]
            idx = np.flatnonzero(seg != 0)  # 4x faster than on the uint64 words themselves
            if idx.size > seg.size >> 3:
                # Dense: an all-ones word between two all-ones words holds no edge.
                full = seg == _ONES
                inner = full.copy()
                inner[1:] &= full[:-1]
                inner[:-1] &= full[1:]
                inner[0] = inner[-1] = False
                idx = np.flatnonzero((seg != 0) & ~inner)
            if idx.size:
                idx += wa
                vals = words[idx]
                prev = words[np.maximum(idx - 1, 0)]
                nxt = words[np.minimum(idx + 1, len(words) - 1)]
                # Outside [g_start, g_end) counts as unallocated: runs are clipped.
                if idx[0] == w_first:
                    vals[0] &= lo_mask
                    prev[0] = 0
                if idx[-1] == w_last:
                    vals[-1] &= hi_mask
                    nxt[-1] = 0
                # A run starts at a set bit whose lower neighbour is clear, and
                # ends at a set bit whose upper neighbour is clear.
                first_bits = vals & ~((vals << np.uint64(1)) | (prev >> np.uint64(63)))
                last_bits = vals & ~((vals >> np.uint64(1)) | ((nxt & np.uint64(1)) << np.uint64(63)))
                s = _bit_positions(idx, first_bits)
                e = _bit_positions(idx, last_bits)
                starts.append(s)
                ends.append(e)
                n_starts += s.size
                n_ends += e.size
            if max_runs is not None and n_starts > max_runs and n_ends >= max_runs:
                break
            wa = wb
        if not n_starts:
            return _EMPTY_RUNS, False
        s_all = np.concatenate(starts)
        e_all = np.concatenate(ends)
        n = n_starts if max_runs is None else min(max_runs, n_starts)
        out = np.stack([s_all[:n], e_all[:n] + 1], axis=1)
        return out, n_starts > n

    # -- persistence -------------------------------------------------------
    def save(self) -> None:
        """fdatasync the sidecar (part of Flush: Base 2.1 §5.27.1.4 volatile write cache).

        Raises OSError when the bitmap cannot be stored (the caller's Flush fails)."""
        fd = self.begin_save()
        if fd >= 0:
            try:
                os.fdatasync(fd)
            except OSError:
                self.dirty = True
                raise

    def begin_save(self) -> int:
        """The event-loop part of :meth:`save`: rewrite a bitmap whose write-through failed;
        returns the fd to fdatasync (any thread may), or -1 when there is nothing to sync."""
        if self.sidecar_fd < 0:
            return -1
        if self.stale:
            _write_exactly(self.sidecar_fd, memoryview(self.bits), _HEADER.size)
            self.stale = False
            self.dirty = True
        if not self.dirty:
            return -1
        self.dirty = False  # updates from now on need the next flush
        return self.sidecar_fd

    def close(self) -> None:
        if self.sidecar_fd >= 0:
            try:
                self.save()
            finally:
                os.close(self.sidecar_fd)
                self.sidecar_fd = -1


def _read_exactly(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise OSError(errno.EIO, "sidecar shorter than its header says")
        buf, offset = buf[n:], offset + n


def _write_exactly(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwritev(fd, [buf], offset)
        buf, offset = buf[n:], offset + n
