"""LBA allocation tracking at TLBAAG granularity (NVM CS 1.2, TP4165).

One bit per Tracked LBA Allocation Granularity granule, packed in a numpy
uint8 array (bit g lives in byte g >> 3, bit g & 7).  The array is a memory
map of a sidecar file beside the backing file, so it survives restarts; at
open it is also OR-ed with the backing file's data extents (SEEK_DATA /
SEEK_HOLE), so writes that reached the file but not the sidecar are never
forgotten.

Rules (NVM CS 1.2 §5.2.2.1, ATYPE 02h):
- a granule's bit is set by any command that writes one of its LBAs;
- it is cleared only when a deallocation covers the whole granule.
"""
from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import numpy as np

_HEADER = struct.Struct("<8sQII")  # magic, nsze, tlbaag, lba_size
_MAGIC = b"NVMEALC1"
_FIRST_BITS = np.array([0xFF, 0xFE, 0xFC, 0xF8, 0xF0, 0xE0, 0xC0, 0x80], dtype=np.uint8)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


class AllocationMap:
    def __init__(self, nsze: int, tlbaag: int, bits: np.ndarray,
                 sidecar: Path | None = None) -> None:
        self.nsze = nsze
        self.tlbaag = tlbaag
        self.granules = (nsze + tlbaag - 1) // tlbaag
        self.bits = bits
        self.sidecar = sidecar
        self.dirty = False

    # -- construction ----------------------------------------------------
    @classmethod
    def in_memory(cls, nsze: int, tlbaag: int) -> "AllocationMap":
        granules = (nsze + tlbaag - 1) // tlbaag
        return cls(nsze, tlbaag, np.zeros((granules + 7) // 8, dtype=np.uint8))

    @classmethod
    def open(cls, data_path: Path, nsze: int, tlbaag: int, data_fd: int,
             lba_size: int) -> "AllocationMap":
        sidecar = Path(str(data_path) + ".alloc")
        granules = (nsze + tlbaag - 1) // tlbaag
        nbytes = (granules + 7) // 8
        header = _HEADER.pack(_MAGIC, nsze, tlbaag, lba_size)
        fresh = True
        if sidecar.exists() and sidecar.stat().st_size == _HEADER.size + nbytes:
            with open(sidecar, "rb") as f:
                fresh = f.read(_HEADER.size) != header
        if fresh:
            with open(sidecar, "wb") as f:
                f.write(header)
                f.truncate(_HEADER.size + nbytes)
        bits = np.memmap(sidecar, dtype=np.uint8, mode="r+", offset=_HEADER.size,
                         shape=(nbytes,)) if nbytes else np.zeros(0, dtype=np.uint8)
        amap = cls(nsze, tlbaag, bits, sidecar)
        amap._merge_data_extents(data_fd, lba_size)
        amap.save()
        return amap

    def _merge_data_extents(self, fd: int, lba_size: int) -> None:
        size = self.nsze * lba_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if end > start:
                slba = start // lba_size
                elba = (end + lba_size - 1) // lba_size
                self.mark_allocated(slba, elba - slba)
            pos = end

    # -- updates -----------------------------------------------------------
    def mark_allocated(self, slba: int, nlb: int) -> None:
        if nlb <= 0:
            return
        g0 = slba // self.tlbaag
        g1 = (slba + nlb - 1) // self.tlbaag
        self._set_range(g0, g1 + 1, True)

    def mark_deallocated(self, slba: int, nlb: int) -> None:
        if nlb <= 0:
            return
        end = slba + nlb
        g0 = -(-slba // self.tlbaag)
        g1 = self.granules if end >= self.nsze else end // self.tlbaag
        if g1 > g0:
            self._set_range(g0, g1, False)

    def _set_range(self, g0: int, g1: int, value: bool) -> None:
        """Set or clear bits [g0, g1)."""
        if g1 <= g0:
            return
        self.dirty = True
        b0, b1 = g0 >> 3, (g1 - 1) >> 3
        first = _FIRST_BITS[g0 & 7]
        last = np.uint8(0xFF >> (7 - ((g1 - 1) & 7)))
        bits = self.bits
        if b0 == b1:
            mask = first & last
            bits[b0] = (bits[b0] | mask) if value else (bits[b0] & ~mask)
            return
        if value:
            bits[b0] |= first
            bits[b1] |= last
            bits[b0 + 1:b1] = 0xFF
        else:
            bits[b0] &= ~first
            bits[b1] &= ~last
            bits[b0 + 1:b1] = 0

    # -- queries -----------------------------------------------------------
    def is_allocated(self, granule: int) -> bool:
        return bool((self.bits[granule >> 3] >> (granule & 7)) & 1)

    def allocated_granules(self) -> int:
        return int(_POPCOUNT[self.bits].sum())

    def allocated_lbas(self) -> int:
        n = self.allocated_granules() * self.tlbaag
        tail = self.granules * self.tlbaag - self.nsze
        if tail and self.granules and self.is_allocated(self.granules - 1):
            n -= tail
        return n

    def runs(self, g_start: int, g_end: int) -> "np.ndarray":
        """Allocated granule runs within [g_start, g_end) as an (n, 2) array of [start, end)."""
        g_end = min(g_end, self.granules)
        if g_end <= g_start:
            return np.zeros((0, 2), dtype=np.int64)
        b0, b1 = g_start >> 3, (g_end + 7) >> 3
        flags = np.unpackbits(self.bits[b0:b1], bitorder="little")
        flags = flags[g_start - (b0 << 3):g_end - (b0 << 3)].astype(np.int8)
        edges = np.diff(np.concatenate(([0], flags, [0])))
        starts = np.flatnonzero(edges == 1) + g_start
        ends = np.flatnonzero(edges == -1) + g_start
        return np.stack([starts, ends], axis=1)

    def save(self) -> None:
        if isinstance(self.bits, np.memmap) and self.dirty:
            self.bits.flush()
        self.dirty = False
