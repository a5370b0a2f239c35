"""Log User Data Changes: the LBA Migration Queue (NVM CS 1.2 §5.6).

Track Send SEL 0h (Base 2.1 §5.1.27.1.1 [2.3 §5.2.28.1.1]) starts and stops
logging into a User Data Migration Queue.  While logging, every write-type
command the target controller completes (Write, Write Zeroes, Dataset
Management deallocate, Sanitize...) posts one Entry Type 0 with the range it
changed, after the change is visible and before the command's completion
(§5.6: the entry may precede the CQE).  No aggregation: one entry per command
(per DSM range), which the round-trip test relies on.

Markers (LBACIR 10b, no range): ESA 001b when logging starts and on Resume,
011b on Suspend, 010b on stop.  The entry that fills the queue carries ESA
111b whatever it is, logging stops, and the One-Shot CDQ Full event goes out
(NVM CS 1.2 §5.6; Base 2.1 §5.1.2.1 One-Shot events); we prefer 111b over
010b/011b for a marker that fills the queue because the host must learn that
the queue is full.

A change of a whole namespace (Sanitize by the logged controller) is posted as
ordinary range entries covering every LBA (LBACIR 00b): NVM CS 1.2 Figure 177
requires LBACIR 00b whenever ESA is 000b, so LBACIR 01b ("all LBAs of NSID")
could only ride on a first/last entry, which such a change is not.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from emulator.nvme import fastgen
from emulator.nvme.migration import cdq, wire
from emulator.nvme.migration.model import CdqState, mmc_state
from emulator.nvme.migration.wire import Esa, Lbacir
from emulator.nvme.spec import Command, CommandSpecific, invalid_field, specific

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller

log = logging.getLogger("nvme.lm.udlog")
MAX_NLB = 1 << 32  # LBAs one Entry Type 0 can describe (NLB 7:4, 0's based)


def track_send_ludc(ctrl: "Controller", cmd: Command) -> tuple[int, int]:
    """Track Send, Log User Data Changes (MOS 3:0 LACT, CDW11 15:0 CDQID)."""
    lact = wire.mos(cmd.cdw10) & 0xF
    q = cdq.lookup(ctrl, cmd.cdw11 & 0xFFFF)  # 37h: not a CDQ of this MMC
    if q.qt != wire.QT_UDMQ:
        raise specific(CommandSpecific.INVALID_CONTROLLER_DATA_QUEUE, "not a UDMQ")
    if lact not in (wire.LACT_STOP, wire.LACT_START):
        raise invalid_field(f"LACT {lact:#x} reserved")
    target = ctrl.subsystem.controllers.get(q.cntlid)
    if target is not None and target.state.suspended:
        # Controller Suspended (39h) for starting and stopping alike (Base 2.3
        # §5.2.28.1.1).  An MMH ends logging of a suspended controller by
        # deleting the queue (CDQ delete, or Suspend with DUDMQ=1).
        raise specific(CommandSpecific.CONTROLLER_SUSPENDED, f"controller {q.cntlid}")
    if lact == wire.LACT_START:
        if q.logging:
            # The spec's 37h for a target already being logged; QEMU treats a
            # repeated start as a no-op.  We follow the spec.
            raise specific(CommandSpecific.INVALID_CONTROLLER_DATA_QUEUE, "already logging")
        if q.full():
            raise specific(CommandSpecific.CONTROLLER_DATA_QUEUE_FULL, f"CDQ {q.cdqid} full")
        q.logging = True
        fastgen.bump()  # the I/O fast path steps aside for a logged controller
        # A successful Track Send discards a pending CDQ Full event (NVM CS §5.6).
        cdq.discard_events(ctrl, q.cdqid, (wire.AEI_CDQ_FULL,))
        post_marker(ctrl, q, Esa.FIRST)
        log.info("MMC %d: logging controller %d into CDQ %d", ctrl.cntlid, q.cntlid, q.cdqid)
    else:
        cdq.discard_events(ctrl, q.cdqid, (wire.AEI_CDQ_FULL,))
        if q.logging:  # stopping a stopped log is accepted silently
            post_marker(ctrl, q, Esa.LAST_STOPPED)
            q.logging = False
            fastgen.bump()
    return 0, 0


def post_marker(ctrl: "Controller", q: CdqState, esa: Esa) -> None:
    _post(ctrl, q, 0, 0, 0, esa, False, Lbacir.NO_RANGE)


def _post(ctrl: "Controller", q: CdqState, nsid: int, nlb0: int, slba: int, esa: Esa,
          dlba: bool, lbacir: Lbacir) -> None:
    if q.used() + 1 == q.slots - 1:  # this entry fills the queue
        esa = Esa.LAST_FULL
        q.logging = False
    body = wire.LMQ_ENTRY.pack(nsid, nlb0, slba, 0)[:wire.LMQ_BODY_LEN]
    if not cdq.post(ctrl, q, body, wire.lbamqa(0, esa, dlba, lbacir)):
        q.logging = False


def on_write(target: "Controller", nsid: int, slba: int, nlb: int, deallocated: bool) -> None:
    """Observer of every write-type command of every controller (nlb is 1's based)."""
    found = cdq.udmq_of(target)
    if found is None or not found[1].logging:
        return
    mmc, q = found
    # NLB is a 32-bit 0's based field: a larger change (a whole namespace, e.g.
    # Sanitize) takes one range entry per 2^32 LBAs (Figure 177: LBACIR 00b).
    while nlb > 0 and q.logging:
        n = min(nlb, MAX_NLB)
        _post(mmc, q, nsid, n - 1, slba, Esa.NORMAL, deallocated, Lbacir.RANGE)
        slba, nlb = slba + n, nlb - n


def on_suspend(target: "Controller", mmc: "Controller", delete: bool) -> None:
    """Suspend (§5.1.17.1.1): ESA 011b marker after the drain, then DUDMQ deletes
    the UDMQ associated with the controller, whichever MMC created it (Figure 351)."""
    found = cdq.udmq_of(target)
    if found is None:
        return
    owner, q = found
    if q.logging:
        post_marker(owner, q, Esa.LAST_SUSPENDED)
    if delete:
        cdq.delete_cdq(owner, q)


def on_resume(target: "Controller") -> None:
    """Resume: the next entry is 'first since resume' (NVM CS §5.6)."""
    found = cdq.udmq_of(target)
    if found is not None and found[1].logging:
        post_marker(found[0], found[1], Esa.FIRST)


def stop_all(mmc: "Controller") -> None:
    """Controller Level Reset of the MMC: its CDQs are deleted (Base §8.1.12)."""
    for q in list(mmc_state(mmc).cdqs.values()):
        cdq.delete_cdq(mmc, q)
