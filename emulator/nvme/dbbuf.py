"""Doorbell Buffer Config (admin 7Ch, Base 2.1 §5.1.7): shadow doorbells.

The host keeps a copy of every I/O queue doorbell in a Shadow Doorbell buffer
(PRP1) and writes the MMIO doorbell only when the new value crosses the
controller's EventIdx (PRP2), using the virtio-style test
``(u16)(new - event_idx - 1) < (u16)(new - old)``.  The admin queue never uses
shadow doorbells.

This controller is event driven (no polling thread), so:
- SQ tail EventIdx = the tail it has processed: every new submission still
  rings the MMIO doorbell.  After arming it re-reads the shadow tail (with a
  full barrier), so a submission racing with the arming is never missed.
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

import struct
import threading
from typing import TYPE_CHECKING

from emulator.memory import DmaError
from emulator.nvme.controller import ADMIN_AVAILABLE, Result, admin_command
from emulator.nvme.spec import AdminOpcode, Command, invalid_field

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.state import CQState, SQState

KEY = "dbbuf"
NEVER = 0xFFFFFFFF
_U32 = struct.Struct("<I")
_fence = threading.Lock()


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


def _read(ctrl: "Controller", addr: int) -> int | None:
    try:
        return _U32.unpack(ctrl.memory.read(addr, 4))[0] if ctrl.memory else None
    except DmaError:
        return None


def _write(ctrl: "Controller", addr: int, value: int) -> None:
    if ctrl.memory is not None and not ctrl.state.suspended:
        try:
            ctrl.memory.store_now(addr, _U32.pack(value & 0xFFFFFFFF))  # the host reads it before ringing
        except DmaError:
            pass


@admin_command(AdminOpcode.DOORBELL_BUFFER_CONFIG)
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
    for sq in ctrl.sqs.values():
        if sq.qid:
            _write(ctrl, db + 8 * sq.qid, sq.tail)
            _write(ctrl, ei + 8 * sq.qid, sq.tail)
    for cq in ctrl.cqs.values():
        if cq.qid:
            _write(ctrl, db + 8 * cq.qid + 4, cq.head)
            _write(ctrl, ei + 8 * cq.qid + 4, NEVER)
    return 0, 0


ADMIN_AVAILABLE[AdminOpcode.DOORBELL_BUFFER_CONFIG] = supported


def queue_created(ctrl: "Controller", qid: int, is_cq: bool) -> None:
    cfg = config(ctrl)
    if cfg is None or qid == 0:
        return
    off = 8 * qid + (4 if is_cq else 0)
    _write(ctrl, cfg[0] + off, 0)
    _write(ctrl, cfg[1] + off, NEVER if is_cq else 0)


def take_shadow_sq_tail(ctrl: "Controller", sq: "SQState") -> None:
    """Use the shadow SQ tail (always at least as new as any MMIO value)."""
    cfg = config(ctrl)
    if cfg is None or sq.qid == 0:
        return
    shadow = _read(ctrl, cfg[0] + 8 * sq.qid)
    if shadow is not None and shadow < sq.size:
        sq.tail = shadow


def after_sq_doorbell(ctrl: "Controller", sq: "SQState") -> None:
    """Arm the SQ EventIdx at the processed tail; pick up racing submissions."""
    cfg = config(ctrl)
    if cfg is None or sq.qid == 0:
        return
    for _ in range(64):
        _write(ctrl, cfg[1] + 8 * sq.qid, sq.tail)
        barrier()
        shadow = _read(ctrl, cfg[0] + 8 * sq.qid)
        if shadow is None or shadow == sq.tail or shadow >= sq.size:
            return
        sq.tail = shadow
        ctrl.process_sq(sq)
        if sq.qid not in ctrl.sqs:
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
