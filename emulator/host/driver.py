"""A userspace NVMe host driver: admin queue, I/O queues, PRP building.

Used by tests to drive controllers exactly as a host would, and by the
migration tool (the MMH) to drive Migration Management Controllers.
"""
from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field

from emulator.host.memory import PAGE, HostMemory
from emulator.host.transport import Transport
from emulator.nvme.spec import (
    CC_EN, CQE, CQE_SIZE, CSTS_RDY, DOORBELL_BASE, REG_ACQ, REG_AQA, REG_ASQ, REG_CAP, REG_CC,
    REG_CSTS, SQE_SIZE, AdminOpcode, FID, IoOpcode, pack_sqe,
)


_U32 = struct.Struct("<I")
_fence = threading.Lock()


def need_event(event_idx: int, new: int, old: int) -> bool:
    """Ring the MMIO doorbell after a shadow doorbell update from ``old`` to ``new``?
    Linux's nvme_dbbuf_need_event, in its u16 arithmetic (wraps included)."""
    return ((new - event_idx - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class CommandTimeout(Exception):
    pass


@dataclass
class Completion:
    dw0: int
    dw1: int
    sqhd: int
    sqid: int
    cid: int
    status: int  # Status Field (15 bits, without phase)
    data: bytes = b""

    @property
    def sc(self) -> int:
        return self.status & 0xFF

    @property
    def sct(self) -> int:
        return (self.status >> 8) & 0x7

    @property
    def dnr(self) -> bool:
        return bool(self.status & (1 << 14))

    @property
    def ok(self) -> bool:
        return (self.status & 0x7FF) == 0

    def __repr__(self) -> str:
        return (f"Completion(cid={self.cid}, sqid={self.sqid}, sct={self.sct:#x}, sc={self.sc:#x}, "
                f"dw0={self.dw0:#x}, dw1={self.dw1:#x})")


class NvmeCommandError(Exception):
    def __init__(self, completion: Completion) -> None:
        super().__init__(f"command failed: {completion!r}")
        self.completion = completion


@dataclass
class HostQueue:
    qid: int
    size: int  # SQ entries (and CQ entries unless cq_entries is set)
    sq_iova: int
    cq_iova: int
    vector: int
    cq_entries: int = 0  # CQ entries when they differ from the SQ's
    sq_tail: int = 0
    cq_head: int = 0
    phase: int = 1
    next_cid: int = 0
    outstanding: dict[int, bool] = field(default_factory=dict)
    done: dict[int, Completion] = field(default_factory=dict)

    @property
    def cq_size(self) -> int:
        return self.cq_entries or self.size


class NvmeHost:
    def __init__(self, transport: Transport, memory: HostMemory | None = None,
                 timeout: float = 10.0, use_interrupts: bool = False) -> None:
        self.t = transport
        self.mem = memory or transport.memory
        self.timeout = timeout
        self.use_interrupts = use_interrupts
        self.queues: dict[int, HostQueue] = {}
        self.page_size = PAGE
        self.mdts_bytes = 0  # MDTS in bytes (0: no limit), after init()
        self.cap = 0
        # Doorbell Buffer Config (enable_shadow_doorbells): (shadow page, EventIdx page),
        # and how many I/O SQ tail / CQ head updates rang the MMIO doorbell, and how many
        # SQ tail updates went to the shadow buffer only.
        self.shadow: tuple[int, int] | None = None
        self.sq_mmio = self.cq_mmio = self.sq_shadow_only = 0

    # ------------------------------------------------------------------ bring-up
    def enable(self, admin_qsize: int = 32, admin_cqsize: int | None = None) -> None:
        """Reset the controller and bring up the admin queue (Base 2.1 §3.5.1);
        the admin CQ has ``admin_cqsize`` entries if given, else ``admin_qsize``."""
        self.cap = self.t.mmio_read(REG_CAP, 8)
        self.disable()
        cqsize = admin_cqsize or admin_qsize
        q = self._alloc_queue(0, admin_qsize, vector=0, cq_entries=cqsize)
        self.t.mmio_write(REG_AQA, 4, ((cqsize - 1) << 16) | (admin_qsize - 1))
        self.t.mmio_write(REG_ASQ, 8, q.sq_iova)
        self.t.mmio_write(REG_ACQ, 8, q.cq_iova)
        # CC: EN, CSS=NVM, MPS=4 KiB, IOSQES=6, IOCQES=4
        self.t.mmio_write(REG_CC, 4, CC_EN | (6 << 16) | (4 << 20))
        self._wait_csts(CSTS_RDY, CSTS_RDY)

    def disable(self) -> None:
        cc = self.t.mmio_read(REG_CC, 4)
        if cc & CC_EN:
            self.t.mmio_write(REG_CC, 4, cc & ~CC_EN)
        self._wait_csts(CSTS_RDY, 0)
        for q in self.queues.values():
            self._free_queue(q)
        self.queues.clear()
        self.shadow = None  # a reset turns shadow doorbells off (Base 2.1 §5.1.7)

    def shutdown(self) -> int:
        """Normal shutdown (CC.SHN=01b); returns CSTS.SHST."""
        cc = self.t.mmio_read(REG_CC, 4)
        self.t.mmio_write(REG_CC, 4, (cc & ~(0x3 << 14)) | (1 << 14))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            shst = (self.t.mmio_read(REG_CSTS, 4) >> 2) & 0x3
            if shst == 2:
                return shst
            time.sleep(0.001)
        return (self.t.mmio_read(REG_CSTS, 4) >> 2) & 0x3

    def _wait_csts(self, mask: int, value: int) -> None:
        deadline = time.monotonic() + self.timeout
        while (self.t.mmio_read(REG_CSTS, 4) & mask) != value:
            if time.monotonic() > deadline:
                raise CommandTimeout(f"CSTS never matched {value:#x}/{mask:#x}")
            time.sleep(0.001)

    def _alloc_queue(self, qid: int, size: int, vector: int, cq_entries: int = 0) -> HostQueue:
        sq = self.mem.alloc(size * SQE_SIZE)
        cq = self.mem.alloc((cq_entries or size) * CQE_SIZE)
        q = HostQueue(qid, size, sq, cq, vector, cq_entries)
        self.queues[qid] = q
        return q

    def _free_queue(self, q: HostQueue) -> None:
        self.mem.free(q.sq_iova, q.size * SQE_SIZE)
        self.mem.free(q.cq_iova, q.cq_size * CQE_SIZE)

    def init(self, io_queues: int = 1, qsize: int = 64) -> bytes:
        """Enable, identify, ask for queues and create ``io_queues`` pairs."""
        self.enable()
        idc = self.identify(cns=1)
        mdts = idc[77]
        self.mdts_bytes = (1 << mdts) * self.page_size if mdts else 0
        self.set_features(FID.NUMBER_OF_QUEUES, ((io_queues - 1) << 16) | (io_queues - 1))
        for qid in range(1, io_queues + 1):
            self.create_io_queue_pair(qid, qsize, vector=qid)
        return idc

    # ------------------------------------------------------------------ submission
    def submit(self, qid: int, opc: int, nsid: int = 0, prp1: int = 0, prp2: int = 0,
               cdw10: int = 0, cdw11: int = 0, cdw12: int = 0, cdw13: int = 0,
               cdw14: int = 0, cdw15: int = 0, flags: int = 0, ring: bool = True) -> int:
        """Place an SQE on queue ``qid``; return its CID."""
        q = self.queues[qid]
        if (q.sq_tail + 1) % q.size == self._sq_head_estimate(q):
            raise RuntimeError(f"SQ {qid} full")
        cid = q.next_cid
        q.next_cid = (q.next_cid + 1) & 0xFFFF
        while q.next_cid in q.outstanding:
            q.next_cid = (q.next_cid + 1) & 0xFFFF
        sqe = pack_sqe(opc, cid, nsid, prp1, prp2, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15,
                       flags=flags)
        self.mem.write(q.sq_iova + q.sq_tail * SQE_SIZE, sqe)
        q.sq_tail = (q.sq_tail + 1) % q.size
        q.outstanding[cid] = True
        if ring:
            self.ring_sq(qid)
        return cid

    def _sq_head_estimate(self, q: HostQueue) -> int:
        # Conservative: everything outstanding may still occupy the SQ.
        return (q.sq_tail - len(q.outstanding)) % q.size

    def ring_sq(self, qid: int) -> None:
        q = self.queues[qid]
        self._doorbell(2 * qid, q.sq_tail)

    def _doorbell(self, index: int, value: int) -> None:
        """Doorbell ``index`` (2*qid SQ tail, 2*qid+1 CQ head) := ``value``.  With shadow
        doorbells an I/O queue's update goes to the Shadow Doorbell buffer and the MMIO
        doorbell is written only if it crosses the controller's EventIdx, as Linux
        does (nvme_dbbuf_update_and_check_event)."""
        off = 4 * index
        if self.shadow is not None and index >= 2:
            db, ei = self.shadow
            old = _U32.unpack(self.mem.read(db + off, 4))[0]
            self.mem.write(db + off, _U32.pack(value))
            _fence.acquire()  # full barrier: the shadow store before the EventIdx load
            _fence.release()
            if not need_event(_U32.unpack(self.mem.read(ei + off, 4))[0], value, old):
                self.sq_shadow_only += not index & 1
                return
            if index & 1:
                self.cq_mmio += 1
            else:
                self.sq_mmio += 1
        self.t.mmio_write(DOORBELL_BASE + off, 4, value)

    def enable_shadow_doorbells(self) -> Completion:
        """Doorbell Buffer Config (admin 7Ch, Base 2.1 §5.1.7): from now on I/O queue
        doorbells go through a Shadow Doorbell buffer and an EventIdx buffer."""
        db, ei = self.mem.alloc(self.page_size), self.mem.alloc(self.page_size)
        c = self.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=db, prp2=ei)
        if c.ok:  # the controller published the doorbell values of existing queues there
            self.shadow = (db, ei)
        return c

    def event_idx(self, qid: int, cq: bool = False) -> int:
        """The EventIdx the controller set for I/O queue ``qid`` (shadow doorbells on)."""
        assert self.shadow is not None
        return _U32.unpack(self.mem.read(self.shadow[1] + 8 * qid + (4 if cq else 0), 4))[0]

    def reap(self, qid: int) -> list[Completion]:
        """Consume every new CQE of ``qid`` (phase-tag check) and ring the CQ doorbell."""
        q = self.queues[qid]
        got: list[Completion] = []
        while True:
            raw = self.mem.read(q.cq_iova + q.cq_head * CQE_SIZE, CQE_SIZE)
            dw0, dw1, sqhd, sqid, cid, sf = CQE.unpack(raw)
            if (sf & 1) != q.phase:
                break
            c = Completion(dw0, dw1, sqhd, sqid, cid, sf >> 1)
            got.append(c)
            q.outstanding.pop(cid, None)
            q.done[cid] = c
            q.cq_head += 1
            if q.cq_head == q.cq_size:
                q.cq_head = 0
                q.phase ^= 1
        if got:
            self._doorbell(2 * qid + 1, q.cq_head)
        return got

    def wait(self, qid: int, cid: int, timeout: float | None = None) -> Completion:
        q = self.queues[qid]
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        spins = 0
        serve = getattr(self.t, "serve_requests", None)
        while cid not in q.done:
            if serve is not None:
                serve()
            self.reap(qid)
            if cid in q.done:
                break
            if time.monotonic() > deadline:
                raise CommandTimeout(f"no completion for cid {cid} on queue {qid}")
            if self.use_interrupts:
                self.t.wait_irq(q.vector, 0.05)
            else:
                spins += 1
                if spins > 100:
                    time.sleep(0.0005)
        return q.done.pop(cid)

    def poll(self, qid: int, cid: int) -> Completion | None:
        q = self.queues[qid]
        if cid not in q.done:
            self.reap(qid)
        return q.done.pop(cid, None)

    # ------------------------------------------------------------------ data buffers
    def build_prps(self, iova: int, length: int) -> tuple[int, int, list[int]]:
        """PRP1/PRP2 for a buffer at ``iova`` (Base 2.1 §4.1.1), and the PRP list
        pages allocated for it (the caller frees them once the command is done)."""
        ps = self.page_size
        first = min(length, ps - (iova % ps))
        rest = length - first
        if rest <= 0:
            return iova, 0, []
        second = iova + first
        if rest <= ps:
            return iova, second, []
        pages = [second + i * ps for i in range((rest + ps - 1) // ps)]
        per_list = ps // 8
        # Chain list pages: the last slot of a full page points to the next.
        chunks: list[list[int]] = []
        while pages:
            if len(pages) <= per_list:
                chunks.append(pages)
                pages = []
            else:
                chunks.append(pages[:per_list - 1])
                pages = pages[per_list - 1:]
        list_pages = [self.mem.alloc(ps) for _ in chunks]
        for i, chunk in enumerate(chunks):
            entries = list(chunk)
            if i + 1 < len(chunks):
                entries.append(list_pages[i + 1])
            self.mem.write(list_pages[i], struct.pack(f"<{len(entries)}Q", *entries))
        return iova, list_pages[0], list_pages

    def build_sgl(self, iova: int, length: int, pieces: int = 1,
                  per_segment: int = 4) -> tuple[int, int, list[tuple[int, int]]]:
        """SGL1 (as PRP1/PRP2 values) for a buffer at ``iova`` cut into ``pieces`` Data Block
        descriptors (Base 2.1 §4.3.2): one piece sits in SGL1; more go into segments of
        ``per_segment`` descriptors chained by Segment descriptors, the final one reached
        by a Last Segment descriptor.  Returns the segment allocations to free."""
        ident = lambda t: t << 4  # noqa: E731  (type 7:4, sub type 0: address)
        step = -(-length // pieces)
        blocks = [(iova + o, min(step, length - o)) for o in range(0, length, step)]
        if len(blocks) == 1:
            a, n = blocks[0]
            return a, n | (ident(0) << 56), []
        groups = [blocks[i:i + per_segment] for i in range(0, len(blocks), per_segment)]
        allocs = [(self.mem.alloc(16 * (len(g) + 1)), 16 * (len(g) + 1)) for g in groups]
        for i, g in enumerate(groups):
            raw = b"".join(struct.pack("<QI3xB", a, n, ident(0)) for a, n in g)
            if i + 1 < len(groups):
                nxt_len = 16 * len(groups[i + 1]) + (16 if i + 2 < len(groups) else 0)
                kind = 0x2 if i + 2 < len(groups) else 0x3
                raw += struct.pack("<QI3xB", allocs[i + 1][0], nxt_len, ident(kind))
            self.mem.write(allocs[i][0], raw)
        first_len = 16 * len(groups[0]) + (16 if len(groups) > 1 else 0)
        kind = 0x2 if len(groups) > 1 else 0x3
        return allocs[0][0], first_len | (ident(kind) << 56), allocs

    def command(self, qid: int, opc: int, nsid: int = 0, data: bytes | None = None,
                read_len: int = 0, cdw10: int = 0, cdw11: int = 0, cdw12: int = 0,
                cdw13: int = 0, cdw14: int = 0, cdw15: int = 0, prp1: int | None = None,
                prp2: int | None = None, buf_offset: int = 0, check: bool = False,
                timeout: float | None = None, sgl: int = 0, sgl_per_segment: int = 4) -> Completion:
        """Run one command synchronously, with an optional data buffer either way.
        ``sgl`` > 0 describes the buffer with an SGL of that many Data Blocks (PSDT 01b),
        ``sgl_per_segment`` of them per segment (:meth:`build_sgl`)."""
        length = len(data) if data is not None else read_len
        buf = None
        list_pages: list[int] = []
        sgl_allocs: list[tuple[int, int]] = []
        p1, p2 = 0, 0
        if length:
            span = length + buf_offset
            buf = self.mem.alloc(span)
            if data is not None:
                self.mem.write(buf + buf_offset, data)
            if sgl:
                p1, p2, sgl_allocs = self.build_sgl(buf + buf_offset, length, sgl, sgl_per_segment)
            else:
                p1, p2, list_pages = self.build_prps(buf + buf_offset, length)
        if prp1 is not None:
            p1 = prp1
        if prp2 is not None:
            p2 = prp2
        cid = self.submit(qid, opc, nsid, p1, p2, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15,
                          flags=(1 << 6) if sgl else 0)
        c = self.wait(qid, cid, timeout)
        if buf is not None:
            if read_len:
                c.data = self.mem.read(buf + buf_offset, read_len)
            self.mem.free(buf, length + buf_offset)
        for page in list_pages:
            self.mem.free(page, self.page_size)
        for addr, size in sgl_allocs:
            self.mem.free(addr, size)
        if check and not c.ok:
            raise NvmeCommandError(c)
        return c

    def admin(self, opc: int, **kw: object) -> Completion:
        return self.command(0, opc, **kw)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ admin helpers
    def identify(self, cns: int, nsid: int = 0, cntid: int = 0, csi: int = 0) -> bytes:
        c = self.admin(AdminOpcode.IDENTIFY, nsid=nsid, read_len=4096,
                       cdw10=cns | (cntid << 16), cdw11=csi << 24, check=True)
        return c.data

    def set_features(self, fid: int, cdw11: int = 0, data: bytes | None = None,
                     nsid: int = 0, cdw12: int = 0, cdw13: int = 0, save: bool = False) -> Completion:
        return self.admin(AdminOpcode.SET_FEATURES, nsid=nsid, data=data,
                          cdw10=fid | (int(save) << 31), cdw11=cdw11, cdw12=cdw12,
                          cdw13=cdw13, check=True)

    def get_features(self, fid: int, sel: int = 0, cdw11: int = 0, read_len: int = 0,
                     nsid: int = 0) -> Completion:
        return self.admin(AdminOpcode.GET_FEATURES, nsid=nsid, cdw10=fid | (sel << 8),
                          cdw11=cdw11, read_len=read_len)

    def get_log_page(self, lid: int, length: int, offset: int = 0, rae: bool = False,
                     lsp: int = 0, nsid: int = 0xFFFFFFFF, lsi: int = 0) -> Completion:
        numd = length // 4 - 1
        return self.admin(AdminOpcode.GET_LOG_PAGE, nsid=nsid, read_len=length,
                          cdw10=lid | (lsp << 8) | (int(rae) << 15) | ((numd & 0xFFFF) << 16),
                          cdw11=(numd >> 16) | (lsi << 16), cdw12=offset & 0xFFFFFFFF,
                          cdw13=offset >> 32)

    def create_io_queue_pair(self, qid: int, qsize: int = 64, vector: int | None = None) -> None:
        vector = qid if vector is None else vector
        q = self._alloc_queue(qid, qsize, vector)
        try:
            self.admin(AdminOpcode.CREATE_IO_CQ, prp1=q.cq_iova,
                       cdw10=((qsize - 1) << 16) | qid, cdw11=(vector << 16) | 0x3, check=True)
            self.admin(AdminOpcode.CREATE_IO_SQ, prp1=q.sq_iova,
                       cdw10=((qsize - 1) << 16) | qid, cdw11=(qid << 16) | 0x1, check=True)
        except Exception:
            del self.queues[qid]
            self._free_queue(q)
            raise

    def delete_io_queue_pair(self, qid: int) -> None:
        self.admin(AdminOpcode.DELETE_IO_SQ, cdw10=qid, check=True)
        self.admin(AdminOpcode.DELETE_IO_CQ, cdw10=qid, check=True)
        self._free_queue(self.queues.pop(qid))

    # ------------------------------------------------------------------ I/O helpers
    def write(self, nsid: int, slba: int, data: bytes, qid: int = 1, lba_size: int = 512,
              fua: bool = False, **kw: object) -> Completion:
        nlb = len(data) // lba_size
        return self.command(qid, IoOpcode.WRITE, nsid=nsid, data=data,
                            cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                            cdw12=(nlb - 1) | (int(fua) << 30), **kw)  # type: ignore[arg-type]

    def read(self, nsid: int, slba: int, nlb: int, qid: int = 1, lba_size: int = 512,
             **kw: object) -> Completion:
        return self.command(qid, IoOpcode.READ, nsid=nsid, read_len=nlb * lba_size,
                            cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=nlb - 1,
                            **kw)  # type: ignore[arg-type]

    def flush(self, nsid: int, qid: int = 1) -> Completion:
        return self.command(qid, IoOpcode.FLUSH, nsid=nsid)

    def write_zeroes(self, nsid: int, slba: int, nlb: int, deac: bool = False,
                     qid: int = 1) -> Completion:
        return self.command(qid, IoOpcode.WRITE_ZEROES, nsid=nsid, cdw10=slba & 0xFFFFFFFF,
                            cdw11=slba >> 32, cdw12=(nlb - 1) | (int(deac) << 25))

    def deallocate(self, nsid: int, ranges: list[tuple[int, int]], qid: int = 1) -> Completion:
        """Dataset Management, AD=1; ranges are (slba, nlb)."""
        data = b"".join(struct.pack("<IIQ", 0, nlb, slba) for slba, nlb in ranges)
        return self.command(qid, IoOpcode.DATASET_MANAGEMENT, nsid=nsid, data=data,
                            cdw10=len(ranges) - 1, cdw11=0x4)

    # ------------------------------------------------------------------ namespaces
    def ns_create(self, nsze: int, flbas: int = 0, nmic: int = 1, ncap: int | None = None,
                  csi: int = 0) -> Completion:
        """Namespace Management, create (SEL 0h); DW0 of the completion is the NSID."""
        data = bytearray(4096)
        struct.pack_into("<QQ", data, 0, nsze, nsze if ncap is None else ncap)
        data[26], data[30] = flbas, nmic
        return self.admin(AdminOpcode.NS_MANAGEMENT, data=bytes(data), cdw10=0, cdw11=csi << 24)

    def ns_delete(self, nsid: int) -> Completion:
        return self.admin(AdminOpcode.NS_MANAGEMENT, nsid=nsid, cdw10=1)

    def ns_attach(self, nsid: int, cntlids: list[int], detach: bool = False) -> Completion:
        """Namespace Attachment: SEL 0h attach, 1h detach, with a Controller List."""
        data = struct.pack(f"<H{len(cntlids)}H", len(cntlids), *cntlids).ljust(4096, b"\0")
        return self.admin(AdminOpcode.NS_ATTACHMENT, nsid=nsid, data=data, cdw10=int(detach))

    def format_nvm(self, nsid: int, lbaf: int = 0, ses: int = 0) -> Completion:
        return self.admin(AdminOpcode.FORMAT_NVM, nsid=nsid,
                          cdw10=(lbaf & 0xF) | (ses << 9) | ((lbaf >> 4) << 12))

    def close(self) -> None:
        self.t.close()
