"""Live migration test helpers: a sparse-aware compare of backing files, and a
"guest" host driver that keeps writing and checking data from a thread."""
from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from emulator.host.driver import NvmeHost
from emulator.nvme.spec import IoOpcode


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, end) of the data (non-hole) extents of a file, SEEK_DATA/SEEK_HOLE."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


def sparse_diff(a: Path, b: Path, size: int, chunk: int = 1 << 20) -> list[int]:
    """Offsets (chunk starts) where the files' data differ over ``size`` bytes, holes read as
    zeros: only the extents holding data in either file are read."""
    diffs: list[int] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        chunks: set[int] = set()  # every chunk touched by data in either file, once
        for s, e in data_extents(fa.fileno(), size) + data_extents(fb.fileno(), size):
            chunks.update(range(s - s % chunk, e, chunk))
        for off in sorted(chunks):
            n = min(chunk, size - off)
            if os.pread(fa.fileno(), n, off).ljust(n, b"\0") != os.pread(fb.fileno(), n, off).ljust(n, b"\0"):
                diffs.append(off)
    return sorted(set(diffs))


class WritingGuest:
    """Writes random 4 KiB blocks (QD1 per loop, one I/O queue) into the first ``span``
    bytes of namespace 1 until stopped; keeps the last data per block and every failure."""

    def __init__(self, h: NvmeHost, span: int = 4 << 20, seed: int = 1) -> None:
        self.h = h
        self.blocks = span // 4096
        self.rng = random.Random(seed)
        self.model: dict[int, bytes] = {}
        self.errors: list[str] = []
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="writing-guest")
        self.buf = h.mem.alloc(4096)

    def start(self) -> "WritingGuest":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            blk = self.rng.randrange(self.blocks)
            data = self.rng.randbytes(4096)
            self.h.mem.write(self.buf, data)
            try:
                cid = self.h.submit(1, IoOpcode.WRITE, nsid=1, prp1=self.buf, cdw10=blk * 8, cdw12=7)
                c = self.h.wait(1, cid, timeout=30)
            except Exception as e:  # a timeout is a failure of the migration
                self.errors.append(f"write {blk}: {e!r}")
                return
            if not c.ok:
                self.errors.append(f"write {blk}: {c!r}")
            self.model[blk] = data
            self.writes += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def verify(self) -> list[int]:
        """Blocks that read back wrong (through the controller, wherever it runs now)."""
        bad = []
        for blk, data in sorted(self.model.items()):
            c = self.h.read(1, blk * 8, 8)
            if not c.ok or c.data != data:
                bad.append(blk)
        return bad
