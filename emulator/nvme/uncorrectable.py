"""LBAs marked by Write Uncorrectable (NVM CS 1.2 §3.3.7).

A read, Compare, Verify or Copy source touching a marked LBA fails with
Unrecovered Read Error until the LBA is written again (Write, Write Zeroes,
a deallocation, Format, Sanitize).  The marks are a sorted list of disjoint
[start, end) LBA ranges kept in ``<backing file>.uncor`` (JSON, written
atomically on every change), so they survive an emulator restart.  Marking
is rare; the hot path (a write or read when nothing is marked) costs one
length test.
"""
from __future__ import annotations

import bisect
import os
from pathlib import Path

import errno

from emulator.nvme import fastgen
from emulator.nvme.persist import atomic_write_json, read_json, reserve_spare
from emulator.nvme.spec import Generic, generic


class UncorrectableMarks:
    def __init__(self, path: Path | None, nsze: int) -> None:
        self.path = path
        self.nsze = nsze
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.generation = 0  # changes since open (LSGC of log 0Eh)
        if path is not None:
            data = read_json(path)
            if isinstance(data, dict) and data.get("nsze") == nsze:
                for s, e in data.get("ranges", []):
                    if 0 <= s < e <= nsze:
                        self._add(int(s), int(e))
            if data is not None:  # room for the next change even on a full file system
                reserve_spare(path, path.stat().st_size if path.exists() else 0)

    @staticmethod
    def sidecar(data_path: Path) -> Path:
        return Path(str(data_path) + ".uncor")

    def __bool__(self) -> bool:
        return bool(self.starts)

    def ranges(self, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
        """Marked [start, end) ranges clipped to [lo, hi)."""
        hi = self.nsze if hi is None else hi
        i = bisect.bisect_right(self.ends, lo)
        out = []
        while i < len(self.starts) and self.starts[i] < hi:
            out.append((max(lo, self.starts[i]), min(hi, self.ends[i])))
            i += 1
        return out

    def count(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends))

    def overlaps(self, slba: int, nlb: int) -> bool:
        if not self.starts:
            return False
        i = bisect.bisect_right(self.ends, slba)
        return i < len(self.starts) and self.starts[i] < slba + nlb

    def mark(self, slba: int, nlb: int) -> None:
        self._add(slba, slba + nlb)
        self._save()

    def clear(self, slba: int, nlb: int) -> None:
        if self.overlaps(slba, nlb):
            self._remove(slba, slba + nlb)
            self._save()

    def clear_all(self) -> None:
        if self.starts:
            self.starts, self.ends = [], []
            self._save()

    def _add(self, s: int, e: int) -> None:
        # merge with every range that overlaps or touches [s, e)
        i = bisect.bisect_left(self.ends, s)
        j = bisect.bisect_right(self.starts, e)
        if i < j:
            s, e = min(s, self.starts[i]), max(e, self.ends[j - 1])
        self.starts[i:j] = [s]
        self.ends[i:j] = [e]

    def _remove(self, s: int, e: int) -> None:
        i = bisect.bisect_right(self.ends, s)
        j = bisect.bisect_left(self.starts, e)
        keep_s: list[int] = []
        keep_e: list[int] = []
        if i < j:
            if self.starts[i] < s:
                keep_s.append(self.starts[i])
                keep_e.append(s)
            if self.ends[j - 1] > e:
                keep_s.append(e)
                keep_e.append(self.ends[j - 1])
        self.starts[i:j] = keep_s
        self.ends[i:j] = keep_e

    def _save(self) -> None:
        """Store the marks.  A full file system that refuses them fails the command with Capacity
        Exceeded (the marks stay changed in memory; the next change stores them all)."""
        self.generation += 1
        fastgen.bump()  # the I/O fast path serves only namespaces without marks
        if self.path is not None:
            try:
                atomic_write_json(self.path, {"nsze": self.nsze,
                                              "ranges": [[s, e] for s, e in zip(self.starts, self.ends)]})
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise generic(Generic.CAPACITY_EXCEEDED,
                                  f"{self.path}: {os.strerror(e.errno)}") from None
                raise
