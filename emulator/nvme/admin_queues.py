"""Create/Delete I/O Submission and Completion Queues (Base 2.1 §5.2.1-5.2.4),
Abort (§5.1.1) and Keep Alive (§5.1.15)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Container

from emulator.nvme import dbbuf
from emulator.nvme.tables import Result
from emulator.nvme.spec import (
    CC_IOCQES_MASK, CC_IOCQES_SHIFT, CC_IOSQES_MASK, CC_IOSQES_SHIFT, CC_MPS_MASK, CC_MPS_SHIFT,
    CQES_LOG2, SQES_LOG2,
    Command, CommandSpecific, Generic, generic, invalid_field, specific,
)
from emulator.nvme.state import CQState, SQState

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller


def check_new_queue(ctrl: "Controller", q: SQState | CQState, cc: int, granted: int,
                    existing: Container[int], cqids: Container[int] = ()) -> None:
    """The rules an I/O queue must meet to exist, in the order Create I/O CQ/SQ
    checks them (Base 2.1 §5.2.1, §5.2.2).  ``cc`` is the Controller
    Configuration in force (CC.MPS, CC.IOSQES/IOCQES), ``granted`` the 0's
    based count from Number of Queues, ``existing`` the queue ids of the same
    kind already there, ``cqids`` the CQs an SQ may bind to.  Migration Send
    Set Controller State applies the same rules to the queues it restores."""
    is_cq = isinstance(q, CQState)
    what = "CQ" if is_cq else "SQ"
    if q.qid == 0 or q.qid > granted + 1 or q.qid in existing:
        raise specific(CommandSpecific.INVALID_QUEUE_IDENTIFIER, f"{what} {q.qid}")
    if q.size < 2 or q.size > ctrl.config.mqes + 1:
        raise specific(CommandSpecific.INVALID_QUEUE_SIZE, f"{what} size {q.size}")
    if isinstance(q, SQState) and (q.cqid == 0 or q.cqid not in cqids):
        raise specific(CommandSpecific.COMPLETION_QUEUE_INVALID, f"CQ {q.cqid}")
    if not q.pc:
        raise invalid_field("CAP.CQR=1: queues must be physically contiguous")
    if is_cq and (cc >> CC_IOCQES_SHIFT) & CC_IOCQES_MASK != CQES_LOG2:
        raise invalid_field("CC.IOCQES")
    if not is_cq and (cc >> CC_IOSQES_SHIFT) & CC_IOSQES_MASK != SQES_LOG2:
        raise invalid_field("CC.IOSQES")
    if isinstance(q, CQState) and q.iv >= ctrl.config.msix_vectors:
        raise specific(CommandSpecific.INVALID_INTERRUPT_VECTOR, f"IV {q.iv}")
    page = 1 << (12 + ((cc >> CC_MPS_SHIFT) & CC_MPS_MASK))
    if q.base == 0 or q.base & (page - 1):
        # PRP1 of a physically contiguous queue must be page aligned (§5.2.1)
        raise generic(Generic.PRP_OFFSET_INVALID, "queue base not page aligned")


def create_io_cq(ctrl: "Controller", cmd: Command) -> Result:
    pc, ien, iv = bool(cmd.cdw11 & 0x1), bool(cmd.cdw11 & 0x2), cmd.cdw11 >> 16
    cq = CQState(qid=cmd.cdw10 & 0xFFFF, base=cmd.prp1, size=((cmd.cdw10 >> 16) & 0xFFFF) + 1,
                 iv=iv, ien=ien, pc=pc)
    check_new_queue(ctrl, cq, ctrl.state.regs.cc, ctrl.state.granted_cqs, ctrl.cqs)
    ctrl.cqs[cq.qid] = cq
    dbbuf.queue_created(ctrl, cq.qid, is_cq=True)
    return 0, 0


def create_io_sq(ctrl: "Controller", cmd: Command) -> Result:
    pc, qprio, cqid = bool(cmd.cdw11 & 0x1), (cmd.cdw11 >> 1) & 0x3, cmd.cdw11 >> 16
    sq = SQState(qid=cmd.cdw10 & 0xFFFF, base=cmd.prp1, size=((cmd.cdw10 >> 16) & 0xFFFF) + 1,
                 cqid=cqid, qprio=qprio, pc=pc)
    check_new_queue(ctrl, sq, ctrl.state.regs.cc, ctrl.state.granted_sqs, ctrl.sqs, ctrl.cqs)
    ctrl.sqs[sq.qid] = sq
    dbbuf.queue_created(ctrl, sq.qid, is_cq=False)
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
