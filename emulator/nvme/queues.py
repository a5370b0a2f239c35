"""Submission and Completion Queue mechanics over guest memory (Base 2.1 §3.3)."""
from __future__ import annotations

from emulator.memory import DmaError, GuestMemory
from emulator.nvme.spec import CQE, CQE_SIZE, SQE_SIZE
from emulator.nvme.state import CQState, SQState


def sq_fetch(sq: SQState, memory: GuestMemory) -> bytes:
    """Read the SQE at the head and advance the head (§3.3.1)."""
    raw = memory.read(sq.base + sq.head * SQE_SIZE, SQE_SIZE)
    sq.head = sq.head + 1 if sq.head + 1 < sq.size else 0
    return raw


def cq_slot_unmapped(cq: CQState, memory: GuestMemory) -> bool:
    """Nothing is mapped at the CQ entry at the tail (the host remaps that memory right now)."""
    try:
        memory.views(cq.base + cq.tail * CQE_SIZE, CQE_SIZE)  # read views: no access, no observer
    except DmaError as e:
        return e.unmapped
    return False


def cq_full(cq: CQState, reserved: int = 0) -> bool:
    """Full when tail+1 == head (one slot is always unused, §3.3.1.5)."""
    used = (cq.tail - cq.head) % cq.size + reserved
    return used >= cq.size - 1


def cq_post(cq: CQState, memory: GuestMemory, dw0: int, dw1: int, sqhd: int, sqid: int,
            cid: int, status: int) -> None:
    """Write one CQE with the current phase tag; wrap flips the phase."""
    entry = CQE.pack(dw0 & 0xFFFFFFFF, dw1 & 0xFFFFFFFF, sqhd, sqid, cid,
                     ((status & 0x7FFF) << 1) | cq.phase)
    memory.write(cq.base + cq.tail * CQE_SIZE, entry)
    cq.tail += 1
    if cq.tail == cq.size:
        cq.tail = 0
        cq.phase ^= 1


def s0pt(cq: CQState) -> int:
    """Phase tag currently in slot 0 (TP4159 I/O CQ State, IOCQA bit 2)."""
    return cq.phase if cq.tail else cq.phase ^ 1


def phase_from_s0pt(tail: int, s0pt_value: int) -> int:
    return s0pt_value if tail else s0pt_value ^ 1
