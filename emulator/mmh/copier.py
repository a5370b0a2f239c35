"""Copy user data: read on the source MMC, write on the destination MMC.

Both MMCs DMA into one host memory (the MMH's memfd is mapped into both
processes), so data read on the source is written to the destination from
the same buffers.  Up to ``depth`` commands of at most MDTS are in flight per
side.
"""
from __future__ import annotations

from typing import Callable

from emulator.host.driver import Completion, NvmeHost
from emulator.host.memory import HostMemory
from emulator.mmh.endpoint import MigrationError
from emulator.mmh.ranges import Range, split
from emulator.nvme.spec import IoOpcode


_GENERIC = {0x02: "Invalid Field in Command", 0x04: "Data Transfer Error", 0x06: "Internal Error",
            0x0B: "Invalid Namespace or Format", 0x80: "LBA Out of Range", 0x81: "Capacity Exceeded"}


def status_text(c: Completion) -> str:
    name = _GENERIC.get(c.sc, "") if c.sct == 0 else ""
    return f"{name + ' ' if name else ''}(SCT {c.sct:#x} SC {c.sc:#x})"


class Copier:
    def __init__(self, src: NvmeHost, dst: NvmeHost, memory: HostMemory, chunk: int = 128 << 10,
                 depth: int = 16) -> None:
        self.src, self.dst, self.mem = src, dst, memory
        self.chunk = min(chunk, src.mdts_bytes or chunk, dst.mdts_bytes or chunk)
        self.depth = depth
        self.buffers = [memory.alloc(self.chunk) for _ in range(depth)]
        self.bytes_copied = 0

    def copy(self, nsid: int, lba_size: int, ranges: list[Range],
             progress: Callable[[int], None] | None = None) -> int:
        """Copy ``ranges`` of ``nsid``; returns the bytes copied."""
        pieces = split(ranges, self.chunk // lba_size)
        done = 0
        for i in range(0, len(pieces), self.depth):
            batch = pieces[i:i + self.depth]
            self._run(self.src, IoOpcode.READ, nsid, lba_size, batch, "source read")
            self._run(self.dst, IoOpcode.WRITE, nsid, lba_size, batch, "destination write")
            n = sum(nlb for _, nlb in batch) * lba_size
            done += n
            self.bytes_copied += n
            if progress is not None:
                progress(n)
        return done

    def _run(self, h: NvmeHost, opc: int, nsid: int, lba_size: int, batch: list[Range], what: str) -> None:
        cids: list[tuple[int, Range, list[int]]] = []
        for (slba, nlb), buf in zip(batch, self.buffers):
            p1, p2, lists = h.build_prps(buf, nlb * lba_size)
            cid = h.submit(1, opc, nsid=nsid, prp1=p1, prp2=p2, cdw10=slba & 0xFFFFFFFF,
                           cdw11=slba >> 32, cdw12=nlb - 1, ring=False)
            cids.append((cid, (slba, nlb), lists))
        h.ring_sq(1)
        failed: tuple[Range, Completion] | None = None
        for cid, rng, lists in cids:
            c = h.wait(1, cid)
            for page in lists:
                h.mem.free(page, h.page_size)
            if not c.ok and failed is None:
                failed = (rng, c)
        if failed is not None:
            (slba, nlb), c = failed
            raise MigrationError(f"{what} of namespace {nsid} LBAs {slba}+{nlb} failed: "
                                 f"{status_text(c)}")
