"""Doorbell Buffer Config (admin 7Ch, Base 2.1 §5.1.7): shadow doorbells.

The host keeps a copy of every I/O queue doorbell in a Shadow Doorbell buffer
(PRP1) and writes the MMIO doorbell only when the new value crosses the
controller's EventIdx (PRP2), using the virtio-style test
``(u16)(new - event_idx - 1) < (u16)(new - old)``.  The admin queue never uses
shadow doorbells.

The host's test is Linux's nvme_dbbuf_need_event, in u16 arithmetic: with
EventIdx 0xFFFF no ``old <= new`` rings, only a wrap of the tail (``new < old``).

- SQ tail EventIdx, without polling (``sq_poll_idle_us: 0``): the tail it has
  processed, so every new submission rings the MMIO doorbell.  After arming it
  re-reads the shadow tail (with a full barrier), so a submission racing with
  the arming is never missed.
- SQ tail EventIdx with polling (emulator/nvme/sqpoll.py): 0xFFFFFFFF while
  the SQ is busy and polled (the host rings once per lap of the queue), armed
  at the processed tail as above after an idle spell.
- CQ head EventIdx = "never" (0xFFFFFFFF): the host stops ringing CQ head
  doorbells (one MMIO exit and one vfio-user message fewer per interrupt),
  and the controller reads CQ heads from the shadow buffer when it needs
  them.  When a CQ is full it arms EventIdx at the current head, so the host
  rings once it frees a slot.

Layout of both buffers (stride 4 << CAP.DSTRD, DSTRD=0): SQ y at 8*y, CQ y at 8*y+4.

A suspended controller (TP4159 Migration Send, Suspend) writes nothing into
host memory, EventIdx included; it re-reads the shadow tails and arms EventIdx
again when it resumes (Controller.kick).

Which controllers offer it (``supported``): the NVMe-defined Controller State
(Base 2.1 §5.1.16, Figures 358-361) has no room for the Doorbell Buffer
Config, so a migration carrying only that state would leave the guest ringing
against stale EventIdx values and stall.  By default a migratable controller of
a subsystem that has an MMC does not support the command (OACS bit 8 clear,
Invalid Command Opcode); ``doorbell_buffer`` in the controller's configuration
overrides the default (docs/tp4159.md).
"""
from __future__ import annotations

import logging
import struct
import threading
import weakref
from typing import TYPE_CHECKING

from emulator.memory import DmaError
from emulator.nvme import sqpoll
from emulator.nvme.tables import Result
from emulator.nvme.spec import Command, invalid_field

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.state import CQState, SQState

KEY = "dbbuf"
NEVER = 0xFFFFFFFF
_U32 = struct.Struct("<I")
_fence = threading.Lock()
log = logging.getLogger("nvme.dbbuf")
# Controllers whose shadow buffers already failed a DMA: logged once at warning,
# then at debug (the host may keep ringing with a buffer it unmapped).
_warned: "weakref.WeakSet[Controller]" = weakref.WeakSet()


def barrier() -> None:
    """A full memory barrier: a locked read-modify-write orders our EventIdx
    store before the shadow load that follows (x86 may reorder store->load)."""
    _fence.acquire()
    _fence.release()


def supported(ctrl: "Controller") -> bool:
    """Doorbell Buffer Config offered by this controller (OACS bit 8)."""
    if ctrl.config.doorbell_buffer is not None:
        return ctrl.config.doorbell_buffer
    if ctrl.config.is_mmc:
        return True
    return not any(c.config.is_mmc for c in ctrl.subsystem.controllers.values())


def config(ctrl: "Controller") -> tuple[int, int] | None:
    v = ctrl.state.vendor.get(KEY)
    return (v[0], v[1]) if v else None


def _dma_failed(ctrl: "Controller", what: str, addr: int, err: DmaError) -> None:
    """A shadow doorbell or EventIdx access outside mapped memory: no command
    to fail, so the doorbell value stays as the MMIO write left it; say so."""
    level = logging.DEBUG if ctrl in _warned else logging.WARNING
    _warned.add(ctrl)
    log.log(level, "ctrl %d: Doorbell Buffer Config %s at %#x failed (%s); "
            "using the MMIO doorbell values", ctrl.cntlid, what, addr, err)


def _read(ctrl: "Controller", addr: int) -> int | None:
    try:
        return _U32.unpack(ctrl.memory.read(addr, 4))[0] if ctrl.memory else None
    except DmaError as e:
        _dma_failed(ctrl, "shadow doorbell read", addr, e)
        return None


def _write(ctrl: "Controller", addr: int, value: int) -> None:
    if ctrl.memory is not None and not ctrl.state.suspended:
        try:
            ctrl.memory.store_now(addr, _U32.pack(value & 0xFFFFFFFF))  # the host reads it before ringing
        except DmaError as e:
            _dma_failed(ctrl, "EventIdx/shadow write", addr, e)


def doorbell_buffer_config(ctrl: "Controller", cmd: Command) -> Result:
    db, ei = cmd.prp1, cmd.prp2
    ps = ctrl.page_size
    if not db or not ei or db & (ps - 1) or ei & (ps - 1) or db == ei:
        raise invalid_field("shadow doorbell / EventIdx buffers must be distinct pages")
    if ctrl.memory is None:
        raise invalid_field("no host memory")
    try:  # both pages must be reachable host memory
        ctrl.memory.views(db, ps)
        ctrl.memory.views(ei, ps, write=True)
    except DmaError:
        raise invalid_field("buffer outside host memory") from None
    ctrl.state.vendor[KEY] = [db, ei]
    # Existing I/O queues switch now: publish their doorbell values (as SPDK does).
    polling = sqpoll.enabled(ctrl)
    for sq in ctrl.sqs.values():
        if sq.qid:
            _write(ctrl, db + 8 * sq.qid, sq.tail)
            _write(ctrl, ei + 8 * sq.qid, sq.tail)
            if polling:
                sqpoll.poller(ctrl).armed_at(sq.qid, sq.tail)
    for cq in ctrl.cqs.values():
        if cq.qid:
            _write(ctrl, db + 8 * cq.qid + 4, cq.head)
            _write(ctrl, ei + 8 * cq.qid + 4, NEVER)
    return 0, 0


def queue_created(ctrl: "Controller", qid: int, is_cq: bool) -> None:
    cfg = config(ctrl)
    if cfg is None or qid == 0:
        return
    off = 8 * qid + (4 if is_cq else 0)
    _write(ctrl, cfg[0] + off, 0)
    _write(ctrl, cfg[1] + off, NEVER if is_cq else 0)
    if not is_cq and sqpoll.enabled(ctrl):
        sqpoll.poller(ctrl).armed_at(qid, 0)  # a new SQ: armed at tail 0, not polled


def shadow_sq_tail(ctrl: "Controller", sq: "SQState") -> int | None:
    """The shadow SQ tail of I/O SQ ``sq``, or None (no buffer, unreadable, out of range)."""
    cfg = config(ctrl)
    if cfg is None or sq.qid == 0:
        return None
    shadow = _read(ctrl, cfg[0] + 8 * sq.qid)
    return shadow if shadow is not None and shadow < sq.size else None


def take_shadow_sq_tail(ctrl: "Controller", sq: "SQState") -> None:
    """Use the shadow SQ tail (always at least as new as any MMIO value)."""
    shadow = shadow_sq_tail(ctrl, sq)
    if shadow is not None:
        sq.tail = shadow


def set_sq_event_idx(ctrl: "Controller", sq: "SQState", value: int) -> None:
    """Store the SQ EventIdx (nothing while suspended, see _write)."""
    cfg = config(ctrl)
    if cfg is not None and sq.qid:
        _write(ctrl, cfg[1] + 8 * sq.qid, value)


def arm_sq_event_idx(ctrl: "Controller", sq: "SQState") -> bool:
    """One arming attempt: EventIdx := the processed tail, a full barrier, the shadow tail
    again.  True if a submission raced with it (the host may have read the old EventIdx
    and not rung): its commands are run now and the caller decides what next."""
    cfg = config(ctrl)
    if cfg is None or sq.qid == 0:
        return False
    _write(ctrl, cfg[1] + 8 * sq.qid, sq.tail)
    barrier()
    shadow = _read(ctrl, cfg[0] + 8 * sq.qid)
    if shadow is None or shadow == sq.tail or shadow >= sq.size:
        return False
    sq.tail = shadow
    ctrl.process_sq(sq)
    return True


def after_sq_doorbell(ctrl: "Controller", sq: "SQState") -> None:
    """After a doorbell (or a kick) processed ``sq``: poll it while it is busy
    (emulator/nvme/sqpoll.py), or arm the SQ EventIdx at the processed tail and
    pick up racing submissions."""
    cfg = config(ctrl)
    if cfg is None or sq.qid == 0:
        return
    if sqpoll.enabled(ctrl):
        sqpoll.poller(ctrl).doorbell_done(sq)
        return
    for _ in range(64):
        if not arm_sq_event_idx(ctrl, sq) or sq.qid not in ctrl.sqs:
            return


def refresh_cq_head(ctrl: "Controller", cq: "CQState", arm: bool) -> None:
    """Take the CQ head from the shadow buffer; ``arm`` asks the host to ring
    the MMIO doorbell on its next head update (used when the CQ is full)."""
    cfg = config(ctrl)
    if cfg is None or cq.qid == 0:
        return
    head = _read(ctrl, cfg[0] + 8 * cq.qid + 4)
    if head is not None and head < cq.size:
        cq.head = head
    if arm:
        _write(ctrl, cfg[1] + 8 * cq.qid + 4, cq.head)
        barrier()
        head = _read(ctrl, cfg[0] + 8 * cq.qid + 4)
        if head is not None and head < cq.size:
            cq.head = head


def shadow_values(ctrl: "Controller", sqs: "list[SQState]", cqs: "list[CQState]") -> None:
    """Set the SQ tails and CQ heads of copies of the I/O queue records to the
    shadow values (state capture: reads only, the live records stay as they are)."""
    cfg = config(ctrl)
    if cfg is None:
        return
    for sq in sqs:
        if sq.qid:
            t = _read(ctrl, cfg[0] + 8 * sq.qid)
            if t is not None and t < sq.size:
                sq.tail = t
    for cq in cqs:
        if cq.qid:
            h = _read(ctrl, cfg[0] + 8 * cq.qid + 4)
            if h is not None and h < cq.size:
                cq.head = h
