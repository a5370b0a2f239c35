"""The C implementation of the I/O fast path (cbind/ioq.c) as emulator/nvme/fastpath.py
drives it: the namespace table, one batch struct per SQ, the call and what comes back.

``FastPath`` decides whether a call may go to the fast path at all (its module text lists
the conditions) and which namespaces are plain; this holds the cffi objects: the
``struct ioq_ns`` table of those namespaces (rebuilt when they change), per SQ a
``struct ioq_batch`` with the fields that rarely change (rebuilt when the SQ or CQ object,
the region table, the namespace table, CC or MDTS changes), and the array the C code
returns its counters in, so that a call stores no field and reads one array.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cbind import ioq
from emulator.nvme import allocation
from emulator.nvme.cmdstats import LAT_BUCKETS

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.state import CQState, SQState

_SIDE = allocation.SIDECAR_WORDS_OFFSET


class CPath:
    """The C tables of one controller's fast path (needs ``ioq.LIB``)."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.ns_key: tuple[Any, ...] | None = None
        self.ns_c: Any = None
        self.ns_maps: list[Any] = []
        self.ns_version = 0  # moves when the namespace table is rebuilt
        self.batches: dict[int, tuple[Any, ...]] = {}  # sqid -> (batch, what its fields were set from)
        self.out: Any = ioq.FFI.new("uint64_t[]", 7 + 2 * LAT_BUCKETS)

    def namespaces(self, eligible: list[tuple[Any, ...]]) -> None:
        """The table of the plain attached namespaces, each (nsid, ns, map, fd, lba_shift,
        nsze, sidecar fd); rebuilt only when one of them changed."""
        key = tuple(eligible)
        if key == self.ns_key:
            return
        t = ioq.FFI.new("struct ioq_ns[]", max(1, len(eligible)))
        maps = []
        for i, (nsid, _ns, amap, fd, shift, nsze, _sfd) in enumerate(eligible):
            e = t[i]
            e.nsid, e.fd, e.lba_shift, e.nsze = nsid, fd, shift, nsze
            e.words = ioq.FFI.cast("uint64_t *", amap.words.ctypes.data)
            e.granules, e.tlbaag = amap.granules, amap.tlbaag
            e.sidecar_fd, e.sidecar_off = amap.sidecar_fd, _SIDE
            maps.append(amap)
        self.ns_key, self.ns_c, self.ns_maps = key, t, maps
        self.ns_version += 1

    def batch(self, ctrl: "Controller", sq: "SQState", cq: "CQState", regions: Any, min_write: int) -> Any:
        """The ``struct ioq_batch`` of ``sq``, its fields that rarely change set only when
        one did: SQState/CQState objects keep their ring for life (a new queue is a new
        object), the tables are replaced."""
        r = ctrl.state.regs
        got = self.batches.get(sq.qid)
        if (got is None or got[1] is not sq or got[2] is not cq or got[3] is not regions
                or got[4] != self.ns_version or got[5] != r.cc or got[6] != ctrl.config.mdts
                or got[7] != min_write):
            b = ioq.FFI.new("struct ioq_batch *")
            b.regions, b.nregions = regions.ctable, regions.n
            b.ns, b.nns = self.ns_c, len(self.ns_maps)
            b.sq_base, b.sq_size, b.sqid = sq.base, sq.size, sq.qid
            b.cq_base, b.cq_size = cq.base, cq.size
            b.page_size = 1 << (12 + ((r.cc >> 7) & 0xF))  # CC.MPS (Base 2.1 §3.1.4.5)
            b.max_transfer, b.min_write = ctrl.max_transfer, min_write
            b.out = self.out
            got = self.batches[sq.qid] = (b, sq, cq, regions, self.ns_version, r.cc,
                                          ctrl.config.mdts, min_write, self.ns_c)
        return got[0]

    def run(self, ctrl: "Controller", sq: "SQState", cq: "CQState", lim: int, regions: Any,
            min_write: int) -> tuple[int, int, int, int, int]:
        """One ``ioq_serve`` call: (commands done, of them Writes, bytes read, bytes
        written, of them with SGLs).  SQ head, CQ tail and phase, latency buckets and
        bitmap flags are updated."""
        b = self.batch(ctrl, sq, cq, regions, min_write)
        ctail, phase = cq.tail, cq.phase
        done: int = ioq.LIB.ioq_serve(b, sq.head, sq.tail, cq.head, ctail, phase, lim)
        if not done:
            return 0, 0, 0, 0, 0
        # SQ head, CQ tail and phase follow from the count (done < CQ size: one wrap at most)
        head = sq.head + done
        sq.head = head if head < sq.size else head - sq.size
        ctail += done
        if ctail >= cq.size:
            cq.tail, cq.phase = ctail - cq.size, phase ^ 1
        else:
            cq.tail = ctail
        o = ioq.FFI.unpack(self.out, 9)  # the layout of ioq_batch.out (cbind/ioq.c)
        nlat = o[6]
        if nlat > 1:
            o = ioq.FFI.unpack(self.out, 7 + 2 * nlat)
        latency = ctrl.cmd_stats.io.latency
        for i in range(7, 7 + 2 * nlat, 2):
            latency[o[i]] += o[i + 1]
        if o[4]:  # a bitmap written through (dirty) or a write-through that failed (stale)
            self.bitmap_flags()
        return done, o[1], o[2], o[3], o[5]

    def bitmap_flags(self) -> None:
        nst = self.ns_c
        for i, amap in enumerate(self.ns_maps):
            e = nst[i]
            if e.dirty:
                e.dirty = 0
                amap.dirty = True
            if e.stale:
                e.stale = 0
                if not amap.stale:
                    self.log.error("%s: bitmap update not stored; rewriting it at the next flush",
                                   amap.sidecar)
                amap.stale = True
