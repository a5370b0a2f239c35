"""Migration Send (41h), Base 2.1 §5.1.17 [2.3 §5.2.17]: Suspend, Resume,
Set Controller State.

Suspend drains nothing: the controller runs every fetched command to
completion before the next message is read, so once the MMC processes the
Suspend the target has no fetched command left except held AERs, which stay
outstanding.  ``state.suspended`` stops fetching, AER delivery and interrupts
(controller.can_fetch/_fire).  Doorbell writes while suspended are recorded
and acted on at Resume.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from emulator.nvme import offload
from emulator.nvme.controller import Result
from emulator.nvme.migration import ctrlstate, udlog, wire
from emulator.nvme.migration.model import mmc_state, target_state
from emulator.nvme.migration.targets import migratable, mmc_command
from emulator.nvme.migration.wire import Seqind
from emulator.nvme.spec import (
    CC_EN, AdminOpcode, Command, CommandSpecific, Generic, generic, invalid_field, specific,
)

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller

log = logging.getLogger("nvme.lm.send")

# Called with the target after every successful Resume (the process hand-over
# layer commits an adopted connection there).
RESUMED: list[Callable[["Controller"], None]] = []


@mmc_command(AdminOpcode.MIGRATION_SEND)
def migration_send(ctrl: "Controller", cmd: Command) -> Result:
    select = wire.sel(cmd.cdw10)
    if select == wire.MIGRATION_SEND_SUSPEND:
        return suspend(ctrl, cmd)
    if select == wire.MIGRATION_SEND_RESUME:
        return resume(ctrl, cmd)
    if select == wire.MIGRATION_SEND_SET_STATE:
        return set_controller_state(ctrl, cmd)
    raise invalid_field(f"Migration Send SEL {select:#x} reserved")


def suspend(mmc: "Controller", cmd: Command) -> Result:
    """Suspend (Figure 351): CDW11 CNTLID 15:0, STYPE 23:16, DUDMQ bit 31."""
    cntlid, stype = cmd.cdw11 & 0xFFFF, (cmd.cdw11 >> 16) & 0xFF
    dudmq = bool(cmd.cdw11 & wire.SUSPEND_DUDMQ)
    target = migratable(mmc, cntlid)
    ts = target_state(target)
    if stype == wire.STYPE_NOTIFICATION:
        ts.notified_by = mmc.cntlid  # advance notice only: no state change
        return 0, 0
    if stype != wire.STYPE_SUSPEND:
        raise invalid_field(f"STYPE {stype:#x} reserved")
    if target.state.suspended:
        return 0, 0  # already suspended with the same STYPE: not an error
    # 1. stop fetching; 2. fetched commands are complete (run to completion)
    #    except AERs; 3. no more transport transactions.
    offload.drain(target)  # commands whose file work runs on a worker thread complete first
    target.state.suspended = True
    ts.suspended_by, ts.notified_by = mmc.cntlid, -1
    ts.suspended_at = [time.monotonic(), time.time()]
    # ESA 011b marker after the drain, then DUDMQ deletes the queue before the
    # CQE (Figure 351 and the §8.1.12.1 example: post, then delete).
    udlog.on_suspend(target, mmc, dudmq)
    log.info("MMC %d: controller %d suspended", mmc.cntlid, cntlid)
    return 0, 0


def resume(mmc: "Controller", cmd: Command) -> Result:
    """Resume: CDW11 CNTLID 15:0."""
    cntlid = cmd.cdw11 & 0xFFFF
    target = migratable(mmc, cntlid)
    if not target.state.suspended:
        raise specific(CommandSpecific.CONTROLLER_NOT_SUSPENDED, f"controller {cntlid}")
    if target_state(target).released:
        # Its host connection went to another process (docs/live-migration.md).
        raise generic(Generic.COMMAND_SEQUENCE_ERROR, f"controller {cntlid} was migrated away")
    if cntlid in mmc_state(mmc).sequences:
        # A Set Controller State sequence was opened and not verified/committed.
        raise generic(Generic.COMMAND_SEQUENCE_ERROR, "controller state not committed")
    udlog.on_resume(target)  # the 'first since resume' marker precedes what follows
    wake(target)
    log.info("MMC %d: controller %d resumed", mmc.cntlid, cntlid)
    for hook in RESUMED:
        hook(target)
    return 0, 0


def wake(target: "Controller") -> None:
    """End the suspended state: fetch what the host queued meanwhile, re-signal CQs."""
    ts = target_state(target)
    if ts.released:
        return  # migrated away: suspended for good
    if ts.held:
        ts.wake_pending = True  # its connection is being handed over: decided by hold(False)
        return
    target.state.suspended = False
    ctrlstate.forget(target)
    ts = target_state(target)
    ts.suspended_by, ts.suspended_at = -1, []
    target.kick()
    target.rearm_interrupts()


def hold(target: "Controller", on: bool) -> None:
    """Hold a suspended controller while its host connection is paused for a hand-over:
    a wake meanwhile waits; at the end of the hold (hand-over undone) it happens."""
    ts = target_state(target)
    ts.held = on
    if not on and ts.wake_pending:
        ts.wake_pending = False
        wake(target)


def release(target: "Controller") -> None:
    """The controller's host connection moved to another process after a live
    migration: its queues go (as at a Controller Level Reset, so a later Set
    Controller State can bring it back as a destination), it stays suspended
    and refuses Resume until a Set Controller State commits a new state."""
    target.controller_level_reset()
    target.state.suspended = True
    ts = target_state(target)
    ts.released, ts.held, ts.wake_pending = True, False, False
    log.info("controller %d released after migration", target.cntlid)


def set_controller_state(mmc: "Controller", cmd: Command) -> Result:
    """Set Controller State: MOS 1:0 SEQIND; CDW11 CNTLID, CSVI 23:16, CSUUIDI 31:24;
    CDW12/13 offset; CDW15 NUMD (dwords, not 0's based)."""
    seqind = Seqind(wire.mos(cmd.cdw10) & 0x3)
    if wire.mos(cmd.cdw10) & ~0x3:
        raise invalid_field("MOS 15:2 reserved")
    cntlid = cmd.cdw11 & 0xFFFF
    csvi, csuuidi = (cmd.cdw11 >> 16) & 0xFF, cmd.cdw11 >> 24
    offset, numd = wire.offset64(cmd.cdw12, cmd.cdw13), cmd.cdw15
    target = migratable(mmc, cntlid)
    if not (target.state.suspended or target.state.regs.cc & CC_EN):
        # Target must be suspended, enabled, or an offline secondary controller.
        raise specific(CommandSpecific.INVALID_CONTROLLER_IDENTIFIER,
                       f"controller {cntlid} neither suspended nor enabled")
    ctrlstate.check_indices(csvi, csuuidi)
    if csvi == 0 and csuuidi == 0:
        raise invalid_field("CSVI and CSUUIDI both 0")
    if offset & 0x3:
        raise invalid_field("offset not dword aligned")
    if numd == 0 and seqind != Seqind.LAST:
        raise invalid_field("NUMD 0 outside a last piece")
    sequences = mmc_state(mmc).sequences
    if seqind in (Seqind.FIRST, Seqind.ONLY):
        sequences.pop(cntlid, None)  # a new sequence discards a partial one
        buf = bytearray()
    elif cntlid not in sequences:
        raise generic(Generic.COMMAND_SEQUENCE_ERROR, "no Set Controller State sequence open")
    else:
        buf = sequences[cntlid]
    try:
        if offset > len(buf):  # pieces come in order: a gap is beyond the structure
            raise invalid_field(f"offset {offset} beyond the Controller State")
        if offset + numd * 4 > ctrlstate.MAX_STATE_BYTES:
            raise specific(CommandSpecific.NOT_ENOUGH_RESOURCES, "Controller State too large")
        piece = mmc.data_from_host(cmd, numd * 4) if numd else b""
        buf = bytearray(buf)
        buf[offset:offset + len(piece)] = piece
        total = ctrlstate.expected_size(buf)
        if total is not None and len(buf) > total:
            raise invalid_field(f"offset {offset} + {len(piece)} beyond the Controller State")
        if seqind in (Seqind.FIRST, Seqind.MIDDLE):
            sequences[cntlid] = buf
            return 0, 0
        parsed = ctrlstate.parse(target, bytes(buf), csvi, csuuidi)
    except Exception:
        sequences.pop(cntlid, None)  # on failure the host resends the whole state
        raise
    sequences.pop(cntlid, None)
    ctrlstate.commit(target, parsed)  # verified: create the queues, set the pointers
    target_state(target).released = False  # a destination again
    if not target.state.suspended:
        target.kick()
    log.info("MMC %d: controller state committed into controller %d (%d I/O SQs)",
             mmc.cntlid, cntlid, sum(1 for k in target.sqs if k))
    return 0, 0
