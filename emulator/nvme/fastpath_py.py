"""The Python implementation of the I/O fast path, as emulator/nvme/fastpath.py drives it.

``FastPath.run`` checks the whole-call conditions (its module text lists them all) and
calls :func:`run_py` when the path is ``python`` (or the C module did not build); this
serves the commands at the SQ head with the per-command conditions, as cbind/ioq.c does
in C: the SQE decode, the PRP walk (inline for one or two pieces, :func:`_prp_list` for
PRP lists and chains) or the SGL walk (emulator/nvme/fastsgl.py), ``preadv``/``pwritev``
between the backing file and guest memory, the allocation bitmap with its write-through
(:func:`_mark_allocated`), the latency buckets and the CQE.  The counters go to
``FastPath._account`` once per call.  The state it keeps is the FastPath's: the ring
places per SQ (``FastPath._rings``), the plain namespaces (``FastPath._nss``) and the
bitmap views (``FastPath._bitmap``).
"""
from __future__ import annotations

import os
import sys
from bisect import bisect_right
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

from cbind.prp import merge_entries
from emulator.nvme import allocation
from emulator.nvme.cmdstats import LAT_BUCKETS
from emulator.nvme.fastsgl import sgl_views
from emulator.nvme.namespace import IOV_MAX
from emulator.nvme.spec import CQE, SQE, IoOpcode

if TYPE_CHECKING:
    from emulator.nvme.fastpath import FastPath, _Regions
    from emulator.nvme.state import CQState, SQState

READ, WRITE = int(IoOpcode.READ), int(IoOpcode.WRITE)
FUA = 1 << 30  # CDW12 bit 30, Force Unit Access (NVM CS 1.2 Figure 48)
LITTLE = sys.byteorder == "little"  # the bitmap words are little-endian
_SIDE = allocation.SIDECAR_WORDS_OFFSET
_UNPACK_SQE, _PACK_CQE = SQE.unpack_from, CQE.pack


def _ring(fp: "FastPath", sq: "SQState", cq: "CQState", regions: "_Regions", min_write: int) -> tuple[Any, ...]:
    """Where the rings are (region view, offset, end), page size and MDTS: per SQ,
    worked out again when the queue objects, the regions or CC change."""
    ctrl = fp.ctrl
    cc, mdts = ctrl.state.regs.cc, ctrl.config.mdts
    got = fp._rings.get(sq.qid)
    if (got is not None and got[0] is sq and got[1] is cq and got[2] is regions
            and got[3] == cc and got[4] == mdts and got[5] == min_write):
        return got
    sqp = regions.place(sq.base, sq.size * 64, False)
    cqp = regions.place(cq.base, cq.size * 16, True)
    ok = sqp is not None and cqp is not None and cq.base >= min_write
    got = (sq, cq, regions, cc, mdts, min_write, ok, sqp, cqp,
           1 << (12 + ((cc >> 7) & 0xF)),  # CC.MPS (Base 2.1 §3.1.4.5)
           ctrl.max_transfer, regions.starts, regions.ends, regions.mems, regions.writable)
    fp._rings[sq.qid] = got
    return got


def run_py(fp: "FastPath", sq: "SQState", cq: "CQState", lim: int, regions: "_Regions", min_write: int) -> int:
    """FastPath.run's Python implementation: serve up to ``lim`` common commands at
    ``sq``'s head; how many completed (their CQEs posted, accounted by FastPath._account)."""
    ring = _ring(fp, sq, cq, regions, min_write)
    if not ring[6]:
        return 0  # a ring not inside one direct region (writable for the CQ)
    # Views made per call, never kept: a kept view would keep the region's mapping
    # alive after a DMA unmap (MappedMemory cannot close an mmap that has exports).
    _s, _c, _r, _cc, _m, _w, _ok, (mem, off, end), cqp, ps, mdts, starts, ends, mems, writable = ring
    sqv = mem[off:end]
    mem, off, end = cqp
    cqv = mem[off:end]
    mask = ps - 1
    ctrl = fp.ctrl
    unpack_sqe = _UNPACK_SQE
    pack_cqe = _PACK_CQE
    preadv, pwritev = os.preadv, os.pwritev  # looked up per call: tests may replace them
    views_of = regions.views
    latency = ctrl.cmd_stats.io.latency
    nss = fp._nss
    head, tail, qsize, sqid = sq.head, sq.tail, sq.size, sq.qid
    ctail, chead, csize, phase = cq.tail, cq.head, cq.size, cq.phase
    done = reads = writes = rbytes = wbytes = sgls = 0
    try:
        while head != tail and done < lim:
            if (ctail + 1) % csize == chead:
                break  # CQ full: the normal path refreshes the head (shadow doorbell)
            t0 = perf_counter_ns()
            (opc, flags, cid, nsid, _c2, _c3, _mptr, prp1, prp2, cdw10, cdw11, cdw12,
             _c13, _c14, _c15) = unpack_sqe(sqv, head << 6)
            if flags & 0x83 or not (opc == READ or (opc == WRITE and not cdw12 & FUA)):
                break  # fused; PSDT 10b or 11b (bit 6 alone: SGL, MPTR an address)
            nsi = nss.get(nsid)
            if nsi is None:
                break  # not attached, or not plain (_conditions)
            fd, shift, nsze, amap, tlbaag, granules, words = nsi
            slba = cdw10 | (cdw11 << 32)
            nlb = (cdw12 & 0xFFFF) + 1
            length = nlb << shift
            if slba + nlb > nsze or length > mdts:
                break
            to_host = opc == READ
            vs: list[memoryview]
            sgl = flags & 0x40  # PSDT 01b: SGL1 in DPTR (Base 2.1 §4.3.2); CDW0 bits 13:10 reserved
            if sgl:
                vs = []
                if not sgl_views(regions, prp1, prp2, length, to_host, min_write, vs):
                    break
            # PRPs (Base 2.1 §4.1.1), the common shapes inline
            elif to_host and prp1 < min_write:
                break
            elif prp1 & 3:
                break
            elif length <= (first := ps - (prp1 & mask)):  # one piece, mostly in one region: no call
                i = bisect_right(starts, prp1) - 1
                if i >= 0 and prp1 + length <= ends[i] and (writable[i] or not to_host):
                    o = prp1 - starts[i]
                    vs = [mems[i][o:o + length]]
                else:
                    vs = []
                    if not views_of(prp1, length, to_host, vs):
                        break
            elif length - first <= ps:
                if prp2 & mask or (to_host and prp2 < min_write):
                    break
                vs = []
                if not views_of(prp1, first, to_host, vs) or not views_of(prp2, length - first, to_host, vs):
                    break
            else:
                vs = []
                if not _prp_list(regions, prp1, first, prp2, length, ps, to_host, min_write, vs):
                    break
            if len(vs) > IOV_MAX:
                break
            try:
                got = (preadv if to_host else pwritev)(fd, vs, slba << shift)
            except OSError:
                break  # the normal path redoes it and reports the status
            if got != length:
                break
            if sgl:
                sgls += 1
            if to_host:
                reads += 1
                rbytes += length
            else:
                # AllocationMap.mark_allocated; granules already allocated (one word) inline
                g0 = slba // tlbaag
                g1 = (slba + nlb - 1) // tlbaag + 1
                w = g0 >> 6
                if words is None or g1 > granules or w != (g1 - 1) >> 6:
                    _mark_allocated(fp, amap, slba, nlb)
                else:
                    m = ((1 << (g1 - g0)) - 1) << (g0 & 63)
                    if words[w] & m != m:
                        _mark_allocated(fp, amap, slba, nlb)
                writes += 1
                wbytes += length
            nhead = head + 1 if head + 1 < qsize else 0
            # One 16-byte copy, as queues.cq_post does: never struct.pack_into on the
            # ring (it zeroes the entry first, and a host polling for phase 0 would
            # take the zeroed entry for a completion).
            o = ctail << 4
            cqv[o:o + 16] = pack_cqe(0, 0, nhead, sqid, cid, phase)
            head = nhead
            ctail += 1
            if ctail == csize:
                ctail = 0
                phase ^= 1
            done += 1
            b = ((perf_counter_ns() - t0) >> 10).bit_length()
            latency[b if b < LAT_BUCKETS else LAT_BUCKETS - 1] += 1
    finally:
        if done:
            sq.head, cq.tail, cq.phase = head, ctail, phase
            fp._account(cq, reads, writes, rbytes, wbytes, done, sgls)
    return done


def _prp_list(regions: "_Regions", prp1: int, first: int, prp2: int, length: int, ps: int,
              to_host: bool, min_write: int, vs: list[memoryview]) -> bool:
    """PRP2 is a list pointer: the walk of emulator/nvme/prp.py over direct regions."""
    mask = ps - 1
    if prp2 & 7:
        return False
    segs = [(prp1, first)]
    remaining = length - first
    npages = (remaining + mask) // ps
    hops = npages + 1
    list_addr = prp2
    while npages:
        hops -= 1
        if hops < 0:
            return False
        slots = (ps - (list_addr & mask)) // 8
        take = npages if npages <= slots else slots - 1
        chained = take < npages
        raw = regions.ring(list_addr, (take + chained) * 8, False)
        if raw is None or merge_entries(bytes(raw), take, ps, remaining, segs) >= 0:
            return False
        remaining -= min(remaining, take * ps)
        npages -= take
        if chained:
            nxt = int.from_bytes(raw[take * 8:take * 8 + 8], "little")
            if nxt & 7:
                return False
            list_addr = nxt
    for addr, n in segs:
        if (to_host and addr < min_write) or not regions.views(addr, n, to_host, vs):
            return False
    return True


def _mark_allocated(fp: "FastPath", amap: Any, slba: int, nlb: int) -> None:
    """AllocationMap.mark_allocated without numpy scalars (same bits, same write-through)."""
    if not LITTLE:
        amap.mark_allocated(slba, nlb)
        return
    g0 = slba // amap.tlbaag
    g1 = min((slba + nlb - 1) // amap.tlbaag + 1, amap.granules)
    if g1 <= g0:
        return
    words, raw = fp._bitmap(amap)
    w0, w1 = g0 >> 6, (g1 - 1) >> 6
    if w0 == w1:
        old = words[w0]
        new = old | ((((1 << (g1 - g0)) - 1) << (g0 & 63)))
        if new == old:
            return
        words[w0] = new
    else:
        words[w0] |= (0xFFFF_FFFF_FFFF_FFFF << (g0 & 63)) & 0xFFFF_FFFF_FFFF_FFFF
        for w in range(w0 + 1, w1):
            words[w] = 0xFFFF_FFFF_FFFF_FFFF
        words[w1] |= 0xFFFF_FFFF_FFFF_FFFF >> (63 - ((g1 - 1) & 63))
    fd = amap.sidecar_fd
    if fd < 0:
        return
    amap.dirty = True
    chunk = raw[w0 * 8:(w1 + 1) * 8]
    try:
        if os.pwrite(fd, chunk, _SIDE + w0 * 8) == len(chunk):
            return
    except OSError:
        pass
    amap._write_through(w0, w1 + 1)  # retries; logs and marks the bitmap stale if it fails
