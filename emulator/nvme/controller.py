"""The NVMe controller: registers, doorbells, queue processing, dispatch.

It sees a GuestMemory, an InterruptSink and a Scheduler; nothing of PCI or
vfio-user.  Commands run to completion when their doorbell is written (the
single-threaded event loop makes every fetched command finish before the
next message is read), except Asynchronous Event Requests, which are held.
Command handlers live in small modules; emulator/nvme/dispatch.py builds each
controller's tables (admin, I/O, Identify CNS, features, log pages) from its
configuration and hands them to the constructor.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import struct
import time
from functools import partial
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any, Callable

from emulator.memory import DmaError, GuestMemory
from emulator.nvme import aer, dbbuf, fastgen, features, sanitize
from emulator.nvme import queues as q
from emulator.nvme.arbitration import Arbiter
from emulator.nvme.cmdstats import CommandStats
from emulator.nvme.config import ControllerConfig
from emulator.nvme.fastpath import FastPath
from emulator.nvme.interfaces import InterruptSink, Scheduler
from emulator.nvme.interrupts import Interrupts
from emulator.nvme.prp import prp_segments
from emulator.nvme.sgl import sgl_segments
from emulator.nvme.spec import (
    CC_CSS_MASK, CC_CSS_SHIFT, CC_EN, CC_MPS_MASK, CC_MPS_SHIFT, CC_SHN_MASK, CC_SHN_SHIFT,
    CSTS_CFS, CSTS_RDY, CSTS_SHST_SHIFT, DOORBELL_BASE, MPS_MAX_LOG2, NVME_VERSION, REG_ACQ, REG_AQA,
    REG_ASQ, REG_CC, REG_INTMC, REG_INTMS, SHST_COMPLETE, Command, Generic, NvmeError,
    generic, status_field,
)
from emulator.nvme.state import ControllerState, CQState, SQState
from emulator.nvme.tables import CommandTables, Observers

if TYPE_CHECKING:
    from emulator.nvme.namespace import Namespace
    from emulator.subsystem.subsystem import Subsystem

log = logging.getLogger("nvme.ctrl")

_REGS = struct.Struct("<QIIIIIIIIQQ")


class Controller(Interrupts):
    """One NVMe controller; its interrupt methods (flush_interrupts, note_posted, ...)
    are in emulator/nvme/interrupts.py."""

    def __init__(self, config: ControllerConfig, tables: CommandTables, subsystem: "Subsystem",
                 irq: InterruptSink | None = None, scheduler: Scheduler | None = None) -> None:
        self.config = config
        self.tables = tables
        self.cntlid = config.cntlid
        self.subsystem = subsystem
        self.irq = irq
        self.scheduler = scheduler
        self.memory: GuestMemory | None = None
        self.state = ControllerState(cntlid=config.cntlid)
        self.sqs: dict[int, SQState] = {}
        self.cqs: dict[int, CQState] = {}
        super().__init__()  # Interrupts: pending counts, coalescing timers, held INTx vectors
        self.arbiter = Arbiter(self)  # bounded round-robin passes over the SQs with work
        self.resets = 0
        self.observers = Observers(list(tables.on_write), list(tables.on_reset),
                                   list(tables.on_memory))
        self.started = time.monotonic()
        self.stats = {"data_units_read": 0, "data_units_written": 0,
                      "host_read_commands": 0, "host_write_commands": 0}
        subsystem.attachments.setdefault(config.cntlid, set(config.namespaces))
        self.cmd_stats = CommandStats()  # management socket `stats` (not resumable state)
        self.xfer_bytes = 0  # PRP data bytes mapped by data_segments, for cmd_stats
        self.cmd_t0 = self.cmd_x0 = 0  # when the executing command started, xfer_bytes then
        self.fast = FastPath(self)  # common Reads and Writes, C or Python (emulator/nvme/fastpath.py)
        features.reset_features(self)

    # ------------------------------------------------------------------ wiring
    def set_memory(self, memory: GuestMemory | None) -> None:
        self.memory = memory
        for hook in self.observers.on_memory:
            hook(self)
        if memory is not None:
            self.kick()

    @property
    def nsids(self) -> set[int]:
        """NSIDs attached to this controller (Namespace Attachment changes them)."""
        return self.subsystem.attached(self.cntlid)

    def namespace(self, nsid: int) -> "Namespace":
        """The attached namespace ``nsid`` or Invalid Namespace or Format."""
        if nsid in self.nsids:
            ns = self.subsystem.namespaces.get(nsid)
            if ns is not None:
                return ns
        raise generic(Generic.INVALID_NAMESPACE, f"namespace {nsid} not attached")

    def attached_namespaces(self) -> list["Namespace"]:
        return [self.subsystem.namespaces[n] for n in sorted(self.nsids)
                if n in self.subsystem.namespaces]

    @property
    def page_size(self) -> int:
        return 1 << (12 + ((self.state.regs.cc >> CC_MPS_SHIFT) & CC_MPS_MASK))

    @property
    def ready(self) -> bool:
        return bool(self.state.regs.csts & CSTS_RDY)

    @property
    def max_transfer(self) -> int:
        return (1 << self.config.mdts) * 4096

    # ------------------------------------------------------------------ registers
    def cap(self) -> int:
        # Base 2.1 §3.1.4.1: MQES, CQR=1, TO=15 (7.5 s), DSTRD=0, CSS bit0 (NVM),
        # MPSMIN=0 (4 KiB), MPSMAX=4 (64 KiB)
        return (self.config.mqes | (1 << 16) | (15 << 24) | (1 << 37)
                | ((MPS_MAX_LOG2 - 12) << 52))

    def _register_file(self) -> bytes:
        r = self.state.regs
        # CAP VS INTMS INTMC CC rsvd CSTS NSSR AQA ASQ ACQ (Base 2.1 Figure 35)
        return _REGS.pack(self.cap(), NVME_VERSION, r.intms, r.intms, r.cc, 0, r.csts, 0,
                          r.aqa, r.asq, r.acq)

    def mmio_read(self, offset: int, size: int) -> int:
        if offset >= DOORBELL_BASE or offset + size > DOORBELL_BASE:
            return 0  # doorbells read as zero
        regs = self._register_file()
        if offset >= len(regs):
            return 0
        chunk = regs[offset:offset + size].ljust(size, b"\0")
        return int.from_bytes(chunk, "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if offset >= DOORBELL_BASE:
            self._doorbell(offset - DOORBELL_BASE, value & 0xFFFFFFFF)
            return
        regs = bytearray(self._register_file())
        end = len(regs)
        regs[offset:offset + size] = value.to_bytes(size, "little")
        del regs[end:]  # bytes past the register file are reserved
        r = self.state.regs
        touched = range(offset, offset + size)

        def hit(start: int, width: int) -> bool:
            return any(start <= b < start + width for b in touched)

        def get(start: int, width: int) -> int:
            return int.from_bytes(regs[start:start + width], "little")

        if hit(REG_INTMS, 4):  # writing 1 sets mask bits (§3.1.4.3)
            r.intms |= get(REG_INTMS, 4)
        if hit(REG_INTMC, 4):  # writing 1 clears mask bits (§3.1.4.4)
            cleared = get(REG_INTMC, 4)
            r.intms &= ~cleared
            self._unmasked(cleared)
        if hit(REG_AQA, 4):
            r.aqa = get(REG_AQA, 4) & 0x0FFF0FFF
        if hit(REG_ASQ, 8):
            r.asq = get(REG_ASQ, 8) & ~0xFFF
        if hit(REG_ACQ, 8):
            r.acq = get(REG_ACQ, 8) & ~0xFFF
        if hit(REG_CC, 4):
            self._write_cc(get(REG_CC, 4))

    def _write_cc(self, new: int) -> None:
        r = self.state.regs
        old = r.cc
        if (old & CC_EN) and not (new & CC_EN):
            r.cc = new
            self.controller_level_reset()
            r.csts &= ~(CSTS_RDY | CSTS_CFS)  # a reset clears the fatal status
            r.csts &= ~(0x3 << CSTS_SHST_SHIFT)
            return
        r.cc = new
        if not (old & CC_EN) and (new & CC_EN):
            self._enable()
        shn = (new >> CC_SHN_SHIFT) & CC_SHN_MASK
        old_shn = (old >> CC_SHN_SHIFT) & CC_SHN_MASK
        if shn and not old_shn:
            self.shutdown()
        elif not shn and old_shn:
            r.csts &= ~(0x3 << CSTS_SHST_SHIFT)

    def _enable(self) -> None:
        r = self.state.regs
        css = (r.cc >> CC_CSS_SHIFT) & CC_CSS_MASK
        mps = (r.cc >> CC_MPS_SHIFT) & CC_MPS_MASK
        asqs = (r.aqa & 0xFFF) + 1
        acqs = ((r.aqa >> 16) & 0xFFF) + 1
        if (css not in (0, 7) or mps > MPS_MAX_LOG2 - 12 or not r.asq or not r.acq
                or asqs < 2 or acqs < 2):
            log.warning("ctrl %d: enable refused (CC=%#x AQA=%#x ASQ=%#x ACQ=%#x)",
                        self.cntlid, r.cc, r.aqa, r.asq, r.acq)
            return  # CSTS.RDY stays 0: the host times out (§3.5.1)
        self.cqs[0] = CQState(qid=0, base=r.acq, size=acqs, iv=0, ien=True)
        self.sqs[0] = SQState(qid=0, base=r.asq, size=asqs, cqid=0)
        r.csts = (r.csts | CSTS_RDY) & ~(0x3 << CSTS_SHST_SHIFT)

    def shutdown(self) -> None:
        """CC.SHN: flush everything; report shutdown complete (§3.6.1)."""
        for ns in self.attached_namespaces():
            ns.flush()
        r = self.state.regs
        r.csts = (r.csts & ~(0x3 << CSTS_SHST_SHIFT)) | (SHST_COMPLETE << CSTS_SHST_SHIFT)
        log.info("ctrl %d: shutdown complete (CC.SHN), namespaces flushed", self.cntlid)

    def controller_level_reset(self) -> None:
        """Controller Level Reset (§3.7.2): queues deleted, AERs dropped, features default."""
        self.drop_interrupts()
        self.arbiter.clear()
        self.resets += 1  # offloaded commands of before the reset are not completed
        self.sqs.clear()
        self.cqs.clear()
        self.state.aer.outstanding.clear()
        self.state.aer.pending.clear()
        self.state.aer.masked_types.clear()
        self.state.suspended = False
        self.state.vendor.pop(dbbuf.KEY, None)  # shadow doorbells off (§5.1.7)
        features.reset_features(self)
        for hook in self.observers.on_reset:
            hook(self)

    def function_reset(self) -> None:
        """PCI function reset: CLR plus all registers to their power-on values."""
        self.controller_level_reset()
        self.state.regs.reset()
        self._intx_pending = 0

    # ------------------------------------------------------------------ doorbells
    def mmio_writer(self, offset: int, size: int) -> Callable[[int], None] | None:
        """A prepared handler for ``size``-byte writes at BAR0 ``offset`` (the optional
        MmioDevice hook): for a 4-byte doorbell, the SQ tail or CQ head doorbell of its
        queue bound to the queue id, taking the value written; None for anything else
        (mmio_write then).  It does exactly what mmio_write does for that write; it
        depends on nothing but the offset, so a caller may keep it for the device's life."""
        if size != 4 or offset < DOORBELL_BASE or offset & 3:
            return None
        idx = (offset - DOORBELL_BASE) >> 2  # CAP.DSTRD = 0 (Base 2.1 §3.1.4.1)
        return partial(self._cq_doorbell if idx & 1 else self._sq_doorbell, idx >> 1)

    def _doorbell(self, offset: int, value: int) -> None:
        idx = offset >> 2  # CAP.DSTRD = 0
        if idx & 1:
            self._cq_doorbell(idx >> 1, value)
        else:
            self._sq_doorbell(idx >> 1, value)

    def _cq_doorbell(self, qid: int, value: int) -> None:
        """CQ y Head Doorbell (Base 2.1 §3.1.4.22)."""
        cq = self.cqs.get(qid)
        if cq is None or value >= cq.size:
            self._doorbell_error(0x00 if cq is None else 0x01)
            return
        cq.head = value
        shadow = qid and self.state.vendor.get(dbbuf.KEY)
        if shadow:  # with shadow doorbells the buffer holds the newest head
            dbbuf.refresh_cq_head(self, cq, arm=False)
        if cq.held:
            self.post_held(cq)
        if qid == 0 or shadow or any(sq.cqid == qid and sq.head != sq.tail for sq in self.sqs.values()):
            self.kick()  # SQs that waited for CQ space (or AERs, or shadow tails) can go on
        else:
            self.flush_interrupts()  # for what post_held posted

    def _sq_doorbell(self, qid: int, value: int) -> None:
        """SQ y Tail Doorbell (Base 2.1 §3.1.4.21)."""
        sq = self.sqs.get(qid)
        if sq is None or value >= sq.size:
            self._doorbell_error(0x00 if sq is None else 0x01)
            return
        sq.tail = value
        if qid and self.state.vendor.get(dbbuf.KEY):
            # With shadow doorbells the MMIO write is only a notification: a
            # posted write can arrive after the shadow tail moved on, and its
            # older value must not move the tail back (Base 2.1 §5.1.7).
            dbbuf.take_shadow_sq_tail(self, sq)
        if self.scheduler is None:  # process_sq, inline
            self.run_sq(sq, None)
        else:
            self.arbiter.ready(qid)
        # The interrupt first, the EventIdx bookkeeping after it: the host starts on its
        # completions while this process re-arms (a racing submission is found by the
        # re-arm's re-check and gets its own interrupt below).  The eventfd write often
        # lets the woken VMM thread preempt this one; nothing the host waits for is left.
        self.flush_interrupts()
        if qid:
            state = self.state  # (looked up again: the commands may have changed it)
            if not state.suspended and state.vendor.get(dbbuf.KEY):
                dbbuf.after_sq_doorbell(self, sq)
                self.flush_interrupts()

    def _doorbell_error(self, aei: int) -> None:
        """Invalid Doorbell Register (00h) / Write Value (01h): an Error event (§5.1.2.1)."""
        aer.post_event(self, aer.AET_ERROR, aei, 0)

    def kick(self) -> None:
        """Process every SQ that has work (after resume, CQ space, memory attach)."""
        fetching = self.can_fetch()
        for cq in list(self.cqs.values()):
            if cq.held and fetching:
                dbbuf.refresh_cq_head(self, cq, arm=False)
                self.post_held(cq)
        for sq in list(self.sqs.values()):
            if sq.qid not in self.sqs or not fetching:
                continue
            if sq.qid:  # shadow tails written while we did not look (e.g. suspended)
                dbbuf.take_shadow_sq_tail(self, sq)
            self.process_sq(sq)
            if sq.qid and sq.qid in self.sqs:
                dbbuf.after_sq_doorbell(self, sq)
        aer.deliver(self)
        self.flush_interrupts()

    # ------------------------------------------------------------------ execution
    def can_fetch(self) -> bool:
        return self.ready and not self.state.suspended and self.memory is not None

    def process_sq(self, sq: SQState) -> None:
        """Run the commands ``sq`` makes available: at once without a scheduler, else in
        bounded round-robin passes (emulator/nvme/arbitration.py), the first one right now."""
        if self.scheduler is None:
            self.run_sq(sq, None)
        else:
            self.arbiter.ready(sq.qid)

    def run_sq(self, sq: SQState, limit: int | None) -> tuple[int, bool]:
        """Fetch and execute up to ``limit`` commands of ``sq``: (commands run, more to run now)."""
        memory = self.memory
        done = 0
        while sq.head != sq.tail and self.can_fetch() and memory is not None:
            if limit is not None and done >= limit:
                return done, True
            n = self.fast.run(sq, None if limit is None else limit - done)
            if n:  # commands completed by the fast path; the first it left runs below
                done += n
                continue
            cq = self.cqs.get(sq.cqid)
            if cq is None:
                return done, False
            if q.cq_full(cq, len(cq.held)):
                dbbuf.refresh_cq_head(self, cq, arm=True)
                self.post_held(cq)
                if q.cq_full(cq, len(cq.held)):
                    return done, False  # resumes when the host frees CQ slots (CQ head doorbell)
            # Queue memory can be unmapped for a while (QEMU remaps guest RAM on PAM changes):
            # the entry stays in the SQ and runs once a DMA_MAP brings the memory back.
            if q.cq_slot_unmapped(cq, memory):
                log.info("ctrl %d: CQ %d entry unmapped: SQ %d waits for a DMA map", self.cntlid, cq.qid, sq.qid)
                return done, False
            try:
                raw = q.sq_fetch(sq, memory)
            except DmaError as e:
                if e.unmapped:
                    log.info("ctrl %d: SQ %d entry unmapped: waits for a DMA map", self.cntlid, sq.qid)
                    return done, False
                self.fatal(f"SQ {sq.qid} fetch failed: {e}")  # the queue is unusable
                return done, False
            cmd = Command(raw, sq.qid)
            self.execute(cmd)
            done += 1
            if sq.qid not in self.sqs:
                return done, False  # deleted by the command itself
        return done, False

    def admin_available(self, opcode: int) -> bool:
        """An admin opcode of the tables that this controller offers now (some
        depend on the subsystem, CommandTables.admin_available)."""
        available = self.tables.admin_available.get(opcode)
        return opcode in self.tables.admin and (available is None or available(self))

    def execute(self, cmd: Command) -> None:
        self.cmd_t0 = t0 = perf_counter_ns()  # for cmd_stats (an offloaded command reads them)
        self.cmd_x0 = x0 = self.xfer_bytes
        table = self.tables.admin if cmd.sqid == 0 else self.tables.io
        handler = table.get(cmd.opc)
        dw0 = dw1 = 0
        try:
            if handler is None or (cmd.sqid == 0 and not self.admin_available(cmd.opc)):
                raise generic(Generic.INVALID_OPCODE, f"opcode {cmd.opc:#x}")
            if cmd.fuse:
                raise generic(Generic.INVALID_FIELD, "fused operations not supported")
            if cmd.psdt and (cmd.sqid == 0 or cmd.psdt == 0x3):
                # SGLs for I/O commands only (PCIe admin commands use PRPs, Base 2.1 §4.1.1)
                raise generic(Generic.INVALID_FIELD, f"PSDT {cmd.psdt}")
            if cmd.sqid and sanitize.blocks_io(self, cmd.opc):  # Base 2.1 §8.1.24
                raise generic(Generic.SANITIZE_IN_PROGRESS, "a sanitize operation is in progress")
            result = handler(self, cmd)
            if result is None:
                return  # held (Asynchronous Event Request)
            dw0, dw1 = result
            status = 0
        except Exception as e:  # a bug must not take the process down either
            status, dw0, dw1 = self.failure(cmd, e)
        self.complete(cmd.sqid, cmd.cid, status, dw0, dw1)
        self.cmd_stats.record(cmd.sqid, cmd.opc, status, self.xfer_bytes - x0, perf_counter_ns() - t0)

    def failure(self, cmd: Command, e: BaseException) -> tuple[int, int, int]:
        """(status, DW0, DW1) of a command that raised ``e``, recorded in the error log."""
        if isinstance(e, NvmeError):
            status, dw0, dw1 = e.status, e.dw0, e.dw1
        elif isinstance(e, DmaError):
            log.info("ctrl %d: cid %d: %s", self.cntlid, cmd.cid, e)
            status, dw0, dw1 = status_field(0, Generic.DATA_TRANSFER_ERROR), 0, 0
        else:
            log.error("ctrl %d: opcode %#x failed", self.cntlid, cmd.opc, exc_info=e)
            status, dw0, dw1 = status_field(0, Generic.INTERNAL_ERROR), 0, 0
        self.record_error(cmd, status)
        return status, dw0, dw1

    def complete(self, sqid: int, cid: int, status: int, dw0: int = 0, dw1: int = 0) -> bool:
        """Post a CQE for a command of ``sqid``; False only if its SQ or CQ is gone.

        A full CQ (or one that already holds completions) keeps the entry in
        ``CQState.held``; it is posted, in order, once the host frees a slot
        (CQ head doorbell, or the shadow head with Doorbell Buffer Config).
        """
        sq = self.sqs.get(sqid)
        if sq is None:
            return False
        cq = self.cqs.get(sq.cqid)
        if cq is None:
            return False
        cq.held.append([dw0 & 0xFFFFFFFF, dw1 & 0xFFFFFFFF, sq.head, sqid, cid, status])
        self.post_held(cq)
        if cq.held:
            dbbuf.refresh_cq_head(self, cq, arm=not self.state.suspended)
            self.post_held(cq)
        return True

    def cq_room(self, cq: CQState) -> bool:
        """True if one more completion can be posted now (nothing held, a free slot)."""
        if not cq.held and q.cq_full(cq):
            dbbuf.refresh_cq_head(self, cq, arm=False)
        return not cq.held and not q.cq_full(cq)

    def post_held(self, cq: CQState) -> None:
        """Post held completions while the CQ has free slots (never while suspended:
        a suspended controller writes nothing into host memory)."""
        if self.memory is None or self.state.suspended or not self.ready:
            return
        posted = 0
        while cq.held and not q.cq_full(cq):
            dw0, dw1, sqhd, sqid, cid, status = cq.held[0]
            try:
                q.cq_post(cq, self.memory, dw0, dw1, sqhd, sqid, cid, status)
            except DmaError as e:
                if e.unmapped:  # a remap in progress: held until the next DMA_MAP (kick)
                    log.info("ctrl %d: CQ %d entry unmapped: completions held until a DMA map", self.cntlid, cq.qid)
                    break
                self.fatal(f"CQ {cq.qid}: completion not posted: {e}")  # the entry stays held
                return
            cq.held.pop(0)
            posted += 1
        if posted:
            self.note_posted(cq.qid, posted)

    def fatal(self, why: str) -> None:
        """A controller fatal status: an error no completion can report (Base 2.1 §3.1.4.6 CSTS.CFS).

        Logged once: until a reset clears CFS, later ones are not logged."""
        r = self.state.regs
        if not r.csts & CSTS_CFS:
            log.error("ctrl %d: controller fatal status: %s", self.cntlid, why)
        r.csts |= CSTS_CFS

    def record_error(self, cmd: Command, status: int) -> None:
        s = self.state
        s.error_count += 1
        s.error_log.insert(0, [s.error_count, cmd.sqid, cmd.cid, status, 0, cmd.nsid])
        del s.error_log[64:]

    # ------------------------------------------------------------------ data transfer
    def data_views(self, cmd: Command, length: int, to_host: bool) -> list[memoryview]:
        """Views of the command's PRP data buffer, for system calls only (see MappedMemory);
        to_host = controller writes memory."""
        views: list[memoryview] = []
        for addr, n in self.data_segments(cmd, length):
            views.extend(self.memory.views(addr, n, write=to_host))  # type: ignore[union-attr]
        return views

    def data_segments(self, cmd: Command, length: int) -> list[tuple[int, int]]:
        """(address, length) segments of the command's data buffer (PRPs or SGLs).

        A transfer longer than MDTS (Base 2.1, Identify Controller data structure, MDTS)
        is Invalid Field in Command, refused before anything is allocated."""
        if length > self.max_transfer:
            raise generic(Generic.INVALID_FIELD, f"transfer of {length} bytes exceeds MDTS")
        if self.memory is None:
            raise generic(Generic.DATA_TRANSFER_ERROR, "no memory")
        if cmd.psdt:  # SGL (I/O commands only: execute() refuses PSDT on the admin queue)
            segs = sgl_segments(self.memory, struct.pack("<QQ", cmd.prp1, cmd.prp2), length)
            if not self.stats.get("sgl_commands"):
                log.info("ctrl %d: the host uses SGLs", self.cntlid)
            self.stats["sgl_commands"] = self.stats.get("sgl_commands", 0) + 1
        else:
            segs = prp_segments(self.memory, cmd.prp1, cmd.prp2, length, self.page_size)
        self.xfer_bytes += length
        return segs

    def data_to_host(self, cmd: Command, payload: bytes, length: int | None = None) -> None:
        """Copy ``payload`` (padded with zeros to ``length``) into the command's buffer.

        Through ``memory.write`` (not the views): memory that can shrink under
        its mapping then gives a DmaError instead of a SIGBUS.
        """
        if length is None:
            length = len(payload)
        segs = self.data_segments(cmd, length)
        if len(payload) < length:
            payload = payload + bytes(length - len(payload))
        pos = 0
        for addr, n in segs:  # all mapped before any byte is stored
            self.memory.views(addr, n)  # type: ignore[union-attr]
        for addr, n in segs:
            self.memory.write(addr, memoryview(payload)[pos:pos + n])  # type: ignore[union-attr]
            pos += n

    def data_from_host(self, cmd: Command, length: int) -> bytes:
        return b"".join(self.memory.read(addr, n)  # type: ignore[union-attr]
                        for addr, n in self.data_segments(cmd, length))

    # ------------------------------------------------------------------ state
    def snapshot(self) -> ControllerState:
        """A copy of the serialisable state, queues in ascending id order.

        Side-effect free (a Get Controller State changes nothing): the live
        queue records are copied, and with shadow doorbells the copies take
        the SQ tails and CQ heads from the Shadow Doorbell buffer, the newest
        values the host published (Base 2.1 §5.1.7).
        """
        state = copy.deepcopy(dataclasses.replace(self.state, sqs=[], cqs=[]))
        state.sqs = [dataclasses.replace(self.sqs[k]) for k in sorted(self.sqs)]
        state.cqs = [dataclasses.replace(self.cqs[k], held=[list(e) for e in self.cqs[k].held])
                     for k in sorted(self.cqs)]
        dbbuf.shadow_values(self, state.sqs, state.cqs)
        return state

    def export_state(self, now: float | None = None,
                     snap: ControllerState | None = None) -> dict[str, Any]:
        """The whole resumable state as plain JSON-able data: the ControllerState
        (registers, queues, features, AERs, error log, extensions; ``snap`` if the
        caller took the snapshot already) plus counters, held INTx vectors and
        uptime (as of monotonic time ``now``).  No side effect."""
        now = time.monotonic() if now is None else now
        snap = self.snapshot() if snap is None else snap
        return {"state": snap.to_dict(), "stats": dict(self.stats),
                "intx_pending": self._intx_pending, "uptime_ms": int((now - self.started) * 1000)}

    def import_state(self, doc: dict[str, Any]) -> None:
        """Inverse of :meth:`export_state` (``doc["state"]`` a dict or a ControllerState)."""
        state = doc["state"]
        self.restore(state if isinstance(state, ControllerState) else ControllerState.from_dict(state))
        self.stats.update(doc.get("stats", {}))
        self._intx_pending = int(doc.get("intx_pending", 0))
        self.started = time.monotonic() - doc.get("uptime_ms", 0) / 1000

    def restore(self, state: ControllerState) -> None:
        self.state = state
        fastgen.bump()  # the I/O fast path works its cached conditions out again
        self.sqs = {s.qid: s for s in state.sqs}
        self.cqs = {c.qid: c for c in state.cqs}
        self._irq.clear()
