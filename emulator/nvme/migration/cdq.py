"""Controller Data Queues: the 45h command, entry posting, Feature 21h, events.

Base 2.1 §5.1.4 [2.3 §5.2.4] (command), §8.1.6 [8.1.7] (queue mechanics),
§5.1.25.1.23 (Feature 21h), §5.1.2 (One-Shot events).  The only queue type is
the User Data Migration Queue (QT 0h), called LBA Migration Queue in the NVM
Command Set (1.2 §5.6); its entries are posted by ``udlog``.
"""
from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from emulator.memory import DmaError
from emulator.nvme import aer, fastgen
from emulator.nvme.migration import wire
from emulator.nvme.migration.model import CdqState, mmc_state
from emulator.nvme.migration.targets import migratable, mmcs
from emulator.nvme.spec import (
    Command, CommandSpecific, Generic, generic, invalid_field, specific,
)
from emulator.nvme.tables import FeatureSpec, Result

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller

log = logging.getLogger("nvme.lm.cdq")

# Limits advertised in Identify Controller (bytes 578-587) and enforced here.
MCUDMQ = 4  # User Data Migration Queues per MMC
MNSUDMQ = 16  # ... per NVM subsystem
MCMR = 64  # memory ranges one CDQ may use
NMCMR = 256  # ... all CDQs of the subsystem together
MCDQPC = 256  # PRP entries in the PRP list of a CDQ create (PC=0)


# ------------------------------------------------------------------ the 45h command
def controller_data_queue(ctrl: "Controller", cmd: Command) -> Result:
    select = wire.sel(cmd.cdw10)
    if select == wire.CdqSel.CREATE:
        return _create(ctrl, cmd, cmd.prp1, vendor=False)
    if select == wire.CdqSel.VS_CREATE_AT:
        return _create(ctrl, cmd, cmd.cdw13 | (cmd.cdw14 << 32), vendor=True)
    if select == wire.CdqSel.DELETE:
        cdqid = cmd.cdw11 & 0xFFFF
        delete_cdq(ctrl, lookup(ctrl, cdqid))
        return 0, 0
    raise invalid_field(f"CDQ SEL {select:#x} reserved")


def _create(ctrl: "Controller", cmd: Command, prp1: int, vendor: bool) -> Result:
    qt = wire.mos(cmd.cdw10) & 0xFF
    pc = bool(cmd.cdw11 & wire.CDW11_PC)
    cntlid = cmd.cdw11 >> 16  # CQS: for QT 0h the controller to log (§5.1.4.1.1.1)
    size_dw = cmd.cdw12  # CDQSIZE, in dwords
    if qt != wire.QT_UDMQ:
        raise invalid_field(f"Queue Type {qt:#x} not supported")  # no status in the text read; QEMU agrees
    migratable(ctrl, cntlid)  # 1Fh: not a migratable controller of this subsystem
    entry = wire.CDQ_ENTRY_SIZE_T0
    if size_dw == 0 or (size_dw * 4) % entry or size_dw * 4 // entry < 2:
        raise invalid_field(f"CDQSIZE {size_dw} is not a multiple of the entry size")
    if vendor and not pc:
        raise invalid_field("vendor specific create needs a physically contiguous queue")
    page = ctrl.page_size
    pages = _queue_pages(ctrl, prp1, pc, size_dw * 4, page)
    q = CdqState(cdqid=0, qt=qt, cntlid=cntlid, pages=pages, pc=pc, page_size=page,
                 size_dw=size_dw, entry_size=entry)
    everyone = [c for m in mmcs(ctrl) for c in mmc_state(m).cdqs.values()]
    if any(c.qt == wire.QT_UDMQ and c.cntlid == cntlid for c in everyone):
        raise invalid_field(f"controller {cntlid} already has a User Data Migration Queue")
    # The UDMQ limits: §5.1.4.1.1 says Invalid Field, §5.1.4.1.1.1 (the UDMQ
    # subsection) says Not Enough Resources.  We follow the more specific one.
    mine = mmc_state(ctrl).cdqs
    if sum(1 for c in mine.values() if c.qt == wire.QT_UDMQ) >= MCUDMQ:
        raise specific(CommandSpecific.NOT_ENOUGH_RESOURCES, "MCUDMQ reached")
    if sum(1 for c in everyone if c.qt == wire.QT_UDMQ) >= MNSUDMQ:
        raise specific(CommandSpecific.NOT_ENOUGH_RESOURCES, "MNSUDMQ reached")
    ranges = q.memory_ranges()
    if ranges > MCMR:
        raise invalid_field(f"{ranges} memory ranges > MCMR {MCMR}")
    if ranges + sum(c.memory_ranges() for c in everyone) > NMCMR:
        raise invalid_field("NMCMR exceeded")
    q.cdqid = next(i for i in range(1, 0x10000) if i not in mine)  # reuse freed ids
    mine[q.cdqid] = q
    log.info("MMC %d: CDQ %d created for controller %d (%d slots at %#x)",
             ctrl.cntlid, q.cdqid, cntlid, q.slots, pages[0])
    return q.cdqid, 0  # DW0 15:0 = CDQID


def _queue_pages(ctrl: "Controller", prp1: int, pc: bool, nbytes: int, page: int) -> list[int]:
    """The queue's page list: PRP offsets must all be 0 (PRP Offset Invalid)."""
    if ctrl.memory is None:
        raise generic(Generic.DATA_TRANSFER_ERROR, "no host memory")
    if prp1 & (page - 1):
        raise generic(Generic.PRP_OFFSET_INVALID, "CDQ PRP1 offset is not 0")
    npages = (nbytes + page - 1) // page
    if pc:
        pages = [prp1]
        spans = [(prp1, nbytes)]
    else:
        if npages > MCDQPC:
            raise invalid_field(f"{npages} PRP entries > MCDQPC {MCDQPC}")
        raw = ctrl.memory.read(prp1, npages * 8)
        pages = list(struct.unpack(f"<{npages}Q", raw))
        if any(p & (page - 1) for p in pages):
            raise generic(Generic.PRP_OFFSET_INVALID, "CDQ PRP list entry offset is not 0")
        spans = [(p, min(page, nbytes - i * page)) for i, p in enumerate(pages)]
    for addr, n in spans:
        try:  # host memory the MMC can write (not CMB/PMR, which we lack anyway)
            ctrl.memory.views(addr, n)
        except DmaError as e:
            raise invalid_field(f"CDQ memory not reachable: {e}") from e
    return pages


def lookup(ctrl: "Controller", cdqid: int) -> CdqState:
    q = mmc_state(ctrl).cdqs.get(cdqid)
    if q is None:
        raise specific(CommandSpecific.INVALID_CONTROLLER_DATA_QUEUE, f"CDQID {cdqid}")
    return q


def delete_cdq(ctrl: "Controller", q: CdqState) -> None:
    """Delete a CDQ; logging into it ends with it (Base 2.1 §5.1.4, Delete)."""
    q.logging = False
    mmc_state(ctrl).cdqs.pop(q.cdqid, None)
    fastgen.bump()  # the I/O fast path (udlog)
    discard_events(ctrl, q.cdqid, (wire.AEI_CDQ_TAIL_POINTER, wire.AEI_CDQ_FULL))
    log.info("MMC %d: CDQ %d deleted", ctrl.cntlid, q.cdqid)


def udmq_of(target: "Controller") -> tuple["Controller", CdqState] | None:
    """The User Data Migration Queue (and its MMC) that logs ``target``, if any."""
    for m in mmcs(target):
        for q in mmc_state(m).cdqs.values():
            if q.qt == wire.QT_UDMQ and q.cntlid == target.cntlid:
                return m, q
    return None


# ------------------------------------------------------------------ posting
def post(ctrl: "Controller", q: CdqState, body: bytes, attrs: int) -> bool:
    """Post one entry: ``body`` is bytes 30:0, ``attrs`` byte 31 without CDQP.

    Writes the byte holding CDQP last (§8.1.6), advances the tail, flips the
    phase on wrap, raises the Tail Pointer event when slot TPT was posted
    (Figure 426: the event and ETPT are one-shot) and the Full event when the
    queue became full.  False if the queue was already full or unreachable.
    """
    if q.full() or ctrl.memory is None:
        return False
    slot = q.tail
    addr = q.slot_address(slot)
    try:
        ctrl.memory.write(addr, body[:q.entry_size - 1])
        ctrl.memory.write(addr + q.entry_size - 1, bytes([attrs | q.phase]))
    except DmaError as e:
        log.error("MMC %d: CDQ %d entry lost: %s", ctrl.cntlid, q.cdqid, e)
        q.logging = False
        return False
    q.tail += 1
    if q.tail == q.slots:
        q.tail = 0
        q.phase ^= 1
    if q.etpt and slot == q.tpt:
        q.etpt = False
        aer.post_event(ctrl, aer.AET_ONE_SHOT, wire.AEI_CDQ_TAIL_POINTER, 0, q.cdqid)
    if q.full():
        aer.post_event(ctrl, aer.AET_ONE_SHOT, wire.AEI_CDQ_FULL, 0, q.cdqid)
    return True


def discard_events(ctrl: "Controller", cdqid: int, aeis: tuple[int, ...]) -> None:
    """Drop not yet reported One-Shot events of a CDQ (Set Features / Track Send)."""
    pending = ctrl.state.aer.pending
    pending[:] = [e for e in pending
                  if not ((e[0] & 0x7) == aer.AET_ONE_SHOT and (e[0] >> 8) & 0xFF in aeis
                          and (e[1] & 0xFFFF) == cdqid)]


# ------------------------------------------------------------------ Feature 21h
def _feature_cdq(ctrl: "Controller", cmd: Command) -> CdqState:
    if not ctrl.config.is_mmc:
        raise invalid_field("no Controller Data Queues on this controller")
    return lookup(ctrl, cmd.cdw11 & 0xFFFF)  # 37h for an unknown CDQID (Figure 426)


def _cdq_feature_set(ctrl: "Controller", cmd: Command) -> Result:
    q = _feature_cdq(ctrl, cmd)
    hp, tpt, etpt = cmd.cdw12, cmd.cdw13, bool(cmd.cdw11 & wire.CDQ_FEATURE_ETPT)
    if q.empty():
        if hp != q.head:  # Figure 426: empty queue, HP must stay
            raise invalid_field(f"CDQ empty: HP {hp} != head {q.head}")
    elif hp >= q.slots or (hp - q.head) % q.slots > q.used():
        # HP must name a posted slot, or the tail (everything consumed).
        raise invalid_field(f"HP {hp} outside posted entries [{q.head}, {q.tail}]")
    if etpt and tpt >= q.slots:
        raise invalid_field(f"TPT {tpt} is not a slot of the CDQ")
    q.head = hp
    q.etpt, q.tpt = etpt, tpt if etpt else 0
    # A successful Set clears a pending Tail Pointer event of that CDQ (§8.1.6).
    discard_events(ctrl, q.cdqid, (wire.AEI_CDQ_TAIL_POINTER,))
    return 0, 0


def _cdq_feature_get(ctrl: "Controller", cmd: Command) -> Result:
    q = _feature_cdq(ctrl, cmd)
    # Figure 427: 512 bytes, HP, TPT (0 when ETPT is 0), reserved.  (libnvme and
    # nvme-cli pass an 8-byte buffer; the spec's structure is 512 bytes.)
    ctrl.data_to_host(cmd, wire.CDQ_FEATURE_DATA.pack(q.head, q.tpt if q.etpt else 0))
    return (wire.CDQ_FEATURE_ETPT if q.etpt else 0) | q.cdqid, 0


CDQ_FEATURE = FeatureSpec(get=_cdq_feature_get, set=_cdq_feature_set)  # FID 21h
