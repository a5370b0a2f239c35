"""Create/Delete I/O Submission and Completion Queues (Base 2.1 §5.2.1-5.2.4),
Abort (§5.1.1) and Keep Alive (§5.1.15)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.nvme import dbbuf
from emulator.nvme.tables import Result
from emulator.nvme.spec import (
    CC_IOCQES_MASK, CC_IOCQES_SHIFT, CC_IOSQES_MASK, CC_IOSQES_SHIFT, CQES_LOG2, SQES_LOG2,
    Command, CommandSpecific, Generic, generic, invalid_field, specific,
)
from emulator.nvme.state import CQState, SQState

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller


def _new_queue(ctrl: "Controller", cmd: Command, granted: int, existing: dict[int, object],
               what: str) -> tuple[int, int]:
    """QID and QSIZE (CDW10) of a queue to create, checked against Number of
    Queues, existing queues and CAP.MQES (§5.2.1, §5.2.2)."""
    qid, qsize = cmd.cdw10 & 0xFFFF, ((cmd.cdw10 >> 16) & 0xFFFF) + 1
    if qid == 0 or qid > granted + 1 or qid in existing:
        raise specific(CommandSpecific.INVALID_QUEUE_IDENTIFIER, f"{what} {qid}")
    if qsize < 2 or qsize > ctrl.config.mqes + 1:
        raise specific(CommandSpecific.INVALID_QUEUE_SIZE, f"{what} size {qsize}")
    return qid, qsize


def _check_base(ctrl: "Controller", prp1: int) -> None:
    if prp1 == 0 or prp1 & (ctrl.page_size - 1):
        # PRP1 of a physically contiguous queue must be page aligned (§5.2.1)
        raise generic(Generic.PRP_OFFSET_INVALID, "queue base not page aligned")


def create_io_cq(ctrl: "Controller", cmd: Command) -> Result:
    qid, qsize = _new_queue(ctrl, cmd, ctrl.state.granted_cqs, ctrl.cqs, "CQ")
    pc, ien, iv = bool(cmd.cdw11 & 0x1), bool(cmd.cdw11 & 0x2), cmd.cdw11 >> 16
    if not pc:
        raise invalid_field("CAP.CQR=1: queues must be physically contiguous")
    if (ctrl.state.regs.cc >> CC_IOCQES_SHIFT) & CC_IOCQES_MASK != CQES_LOG2:
        raise invalid_field("CC.IOCQES")
    if iv >= ctrl.config.msix_vectors:
        raise specific(CommandSpecific.INVALID_INTERRUPT_VECTOR, f"IV {iv}")
    _check_base(ctrl, cmd.prp1)
    ctrl.cqs[qid] = CQState(qid=qid, base=cmd.prp1, size=qsize, iv=iv, ien=ien, pc=pc)
    dbbuf.queue_created(ctrl, qid, is_cq=True)
    return 0, 0


def create_io_sq(ctrl: "Controller", cmd: Command) -> Result:
    qid, qsize = _new_queue(ctrl, cmd, ctrl.state.granted_sqs, ctrl.sqs, "SQ")
    pc, qprio, cqid = bool(cmd.cdw11 & 0x1), (cmd.cdw11 >> 1) & 0x3, cmd.cdw11 >> 16
    if cqid == 0 or cqid not in ctrl.cqs:
        raise specific(CommandSpecific.COMPLETION_QUEUE_INVALID, f"CQ {cqid}")
    if not pc:
        raise invalid_field("CAP.CQR=1: queues must be physically contiguous")
    if (ctrl.state.regs.cc >> CC_IOSQES_SHIFT) & CC_IOSQES_MASK != SQES_LOG2:
        raise invalid_field("CC.IOSQES")
    _check_base(ctrl, cmd.prp1)
    ctrl.sqs[qid] = SQState(qid=qid, base=cmd.prp1, size=qsize, cqid=cqid, qprio=qprio, pc=pc)
    dbbuf.queue_created(ctrl, qid, is_cq=False)
    return 0, 0


def delete_io_sq(ctrl: "Controller", cmd: Command) -> Result:
    qid = cmd.cdw10 & 0xFFFF
    if qid == 0 or qid not in ctrl.sqs:
        raise specific(CommandSpecific.INVALID_QUEUE_IDENTIFIER, f"SQ {qid}")
    # Commands run to completion when fetched: nothing is left to abort.
    del ctrl.sqs[qid]
    return 0, 0


def delete_io_cq(ctrl: "Controller", cmd: Command) -> Result:
    qid = cmd.cdw10 & 0xFFFF
    if qid == 0 or qid not in ctrl.cqs:
        raise specific(CommandSpecific.INVALID_QUEUE_IDENTIFIER, f"CQ {qid}")
    if any(sq.cqid == qid for sq in ctrl.sqs.values()):
        raise specific(CommandSpecific.INVALID_QUEUE_DELETION, f"CQ {qid} has SQs")
    del ctrl.cqs[qid]
    return 0, 0


def abort(ctrl: "Controller", cmd: Command) -> Result:
    # Every fetched command has already completed, except held AERs, which
    # this controller does not abort: DW0 bit 0 = 1 "command not aborted".
    return 1, 0


def keep_alive(ctrl: "Controller", cmd: Command) -> Result:
    return 0, 0
