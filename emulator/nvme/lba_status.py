"""Get LBA Status (admin 86h, NVM CS 1.2 §4.2.1) with Action Type 02h
"return tracked allocated LBAs" (TP4165), Action Types 10h/11h (potentially
unrecoverable LBAs: the Write Uncorrectable marks), and the TP4165 Identify fields.

* Identify Namespace, NVM (CNS 05h) bytes 295:292 TLBAAG: the namespace's
  Tracked LBA Allocation Granularity (NVM CS 1.2 Figure 118).
* Identify Controller, NVM (CNS 06h) bytes 19:18 AOCS bit 0 RALBAS:
  Reporting Allocated LBA Supported (NVM CS 1.2 Figure 120).
* OACS.GLSS (Identify Controller bit 9) is 1: 10h/11h are supported, with what
  GLSS requires (emulator.nvme.lba_status_log: log 0Eh, Feature 15h).

Settled from spec text (summaries of the TP left these open):

* GLSS vs RALBAS.  NVM CS 1.2 §5.2.2: "If Action Types 10h and 11h are
  supported (refer to the ... GLSS bit in ... OACS), then the controller
  shall" support the LBA Status Information alert, log page 0Eh, extended
  Get Log Page offsets and the LBA Status Information Attributes Feature.
  GLSS is about 10h/11h only; RALBAS alone advertises 02h.
* Other ATYPEs.  NVM CS 1.0 Figure 110 lists 10h and 11h, "All others
  Reserved"; a reserved or unsupported value in a defined field is Invalid
  Field in Command (Base status 02h).
* 10h/11h descriptors carry STAS 0 (LBARS is defined for 02h only).
  (RALBAS is always 1 here, so "ATYPE 02h without RALBAS" cannot happen.)
* CMPC.  NVM CS 1.0 Figure 111: "If there are no more LBA Status Descriptor
  Entries to transfer in the specified range, the controller shall return
  Completion Condition 2h" -- so a buffer filled exactly by the last
  descriptors says 2h, not 1h.  1h: MNDW reached and more may exist.
* DSLBA / NLB.  Figure 112 and the text after it: the first DSLBA is the
  lowest qualifying LBA >= SLBA, each next one the lowest qualifying LBA
  after the previous DSLBA + NLB; "the controller should return the largest
  aggregated possible value" in NLB (0's based) -- runs are coalesced.

Decisions where the text read is silent:

* NSID not an attached namespace, including FFFFFFFFh (the Base admin
  command table marks Get LBA Status as not supporting the broadcast value)
  -> Invalid Namespace or Format, as for every namespace command here.
* SLBA >= NSZE -> LBA Out of Range.  A range (SLBA + RL) that runs past the
  end of the namespace is clipped at NSZE, as RL = 0 is.
* MNDW is honoured as a maximum: the controller transfers the header and the
  descriptors that fit, never more than (MNDW + 1) * 4 bytes nor MDTS; an
  MNDW too small for the 8-byte header transfers its first MNDW + 1 dwords
  of it.  The list is cut at a descriptor boundary with CMPC = 1h
  (incomplete); the host continues from a later SLBA.
* Reserved CDW13 bits 23:16 are ignored.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from emulator.nvme.tables import Result
from emulator.nvme.spec import Command, Generic, generic, invalid_field

if TYPE_CHECKING:
    from emulator.nvme.allocation import AllocationMap
    from emulator.nvme.controller import Controller
    from emulator.nvme.namespace import Namespace

# Action Type (CDW13 bits 31:24), NVM CS 1.2 §4.2.1
ATYPE_ALLOCATED = 0x02  # return tracked allocated LBAs (TP4165, needs RALBAS)
ATYPE_SCAN_UNRECOVERABLE = 0x10  # scan + return untracked and tracked potentially unrecoverable
ATYPE_TRACKED_UNRECOVERABLE = 0x11  # return tracked potentially unrecoverable

# Completion Condition (LBA Status Descriptor List byte 4)
CMPC_NONE, CMPC_INCOMPLETE, CMPC_COMPLETE = 0x0, 0x1, 0x2

# LBA Status Descriptor List header: NLSD (3:0), CMPC (4), reserved (7:5)
LBA_STATUS_HEADER = struct.Struct("<IB3x")
# LBA Status Descriptor Entry: DSLBA (7:0), NLB 0's based (11:8), reserved (12),
# STAS (13, bits 2:0 LBARS), reserved (15:14)
LBA_STATUS_DESCRIPTOR = struct.Struct("<QIxB2x")
LBARS_ALLOCATED = 0b010  # one or more of the reported LBAs are allocated (ATYPE 02h)
MAX_DESCRIPTOR_NLB = 1 << 32  # NLB is a 32-bit 0's based count

# Identify offsets
TLBAAG_OFFSET = 292  # CNS 05h bytes 295:292
AOCS_OFFSET = 18  # CNS 06h bytes 19:18
AOCS_RALBAS = 0x1


# The descriptor entry as a numpy record, to build long lists without a Python loop.
DESCRIPTOR_DTYPE = np.dtype([("dslba", "<u8"), ("nlb", "<u4"), ("rsvd12", "u1"), ("stas", "u1"),
                             ("rsvd14", "<u2")])
assert DESCRIPTOR_DTYPE.itemsize == LBA_STATUS_DESCRIPTOR.size


def allocated_descriptors(amap: "AllocationMap", slba: int, end: int,
                          capacity: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """DSLBAs and LBA counts of the allocated LBAs in [slba, end), at most ``capacity``.

    Granules are reported whole but clipped to the range; contiguous granules
    are coalesced ("the controller should return the largest aggregated
    possible value", NVM CS §4.2.1 Figure 112), so the first DSLBA is the
    lowest allocated LBA >= SLBA and each next one lies beyond the previous
    descriptor.  ``more`` is True when descriptors beyond ``capacity`` exist.
    """
    t = amap.tlbaag
    runs, more = amap.runs(slba // t, -(-end // t), max_runs=capacity)
    lo = np.maximum(runs[:, 0] * t, slba)
    counts = np.minimum(runs[:, 1] * t, end) - lo
    if counts.size and int(counts.max()) > MAX_DESCRIPTOR_NLB:
        # NLB is 32 bits: a longer run takes several descriptors (only beyond 2 TiB of 512 B LBAs)
        pieces = [(s + k, min(MAX_DESCRIPTOR_NLB, n - k)) for s, n in zip(lo.tolist(), counts.tolist())
                  for k in range(0, n, MAX_DESCRIPTOR_NLB)]
        more = more or len(pieces) > capacity
        pieces = pieces[:capacity]
        lo = np.array([p[0] for p in pieces], dtype=np.int64)
        counts = np.array([p[1] for p in pieces], dtype=np.int64)
    return lo, counts, more


def descriptor_list(dslba: np.ndarray, counts: np.ndarray, complete: bool,
                    stas: int = LBARS_ALLOCATED) -> bytes:
    """The LBA Status Descriptor List (NVM CS 1.2 §4.2.1): header, then 16-byte entries."""
    entries = np.zeros(len(dslba), dtype=DESCRIPTOR_DTYPE)
    entries["dslba"] = dslba
    entries["nlb"] = counts - 1  # 0's based
    entries["stas"] = stas
    header = LBA_STATUS_HEADER.pack(len(dslba), CMPC_COMPLETE if complete else CMPC_INCOMPLETE)
    return header + entries.tobytes()


def get_lba_status(ctrl: "Controller", cmd: Command) -> Result:
    ns = ctrl.namespace(cmd.nsid)  # Invalid Namespace or Format (FFFFFFFFh included)
    slba = cmd.cdw10 | (cmd.cdw11 << 32)  # SLBA, CDW10/11
    mndw = cmd.cdw12  # MNDW, 0's based dwords
    rl = cmd.cdw13 & 0xFFFF  # RL, 0 = to the end of the namespace
    atype = (cmd.cdw13 >> 24) & 0xFF  # ATYPE
    if atype not in (ATYPE_ALLOCATED, ATYPE_SCAN_UNRECOVERABLE, ATYPE_TRACKED_UNRECOVERABLE):
        raise invalid_field(f"Get LBA Status ATYPE {atype:#x} not supported")
    if slba >= ns.nsze:
        raise generic(Generic.LBA_OUT_OF_RANGE, f"SLBA {slba} >= NSZE {ns.nsze}")
    end = ns.nsze if rl == 0 else min(slba + rl, ns.nsze)
    length = min((mndw + 1) * 4, ctrl.max_transfer)
    capacity = max(0, (length - LBA_STATUS_HEADER.size) // LBA_STATUS_DESCRIPTOR.size)
    if atype == ATYPE_ALLOCATED:
        dslba, counts, more = allocated_descriptors(ns.allocation, slba, end, capacity)
        payload = descriptor_list(dslba, counts, complete=not more)
    else:
        # 10h and 11h: the Write Uncorrectable marks are the only potentially
        # unrecoverable LBAs, all tracked, so a scan finds the same ones.
        runs = [(s, min(e - s, MAX_DESCRIPTOR_NLB)) for s, e in ns.uncorrectable.ranges(slba, end)]
        more = len(runs) > capacity
        runs = runs[:capacity]
        payload = descriptor_list(np.array([r[0] for r in runs], dtype=np.int64),
                                  np.array([r[1] for r in runs], dtype=np.int64),
                                  complete=not more, stas=0)
    ctrl.data_to_host(cmd, payload[:length])
    return 0, 0


def identify_tlbaag(ctrl: "Controller", ns: "Namespace", b: bytearray) -> None:
    struct.pack_into("<I", b, TLBAAG_OFFSET, ns.allocation.tlbaag)  # TLBAAG, Figure 118


def identify_ralbas(ctrl: "Controller", b: bytearray) -> None:
    aocs = struct.unpack_from("<H", b, AOCS_OFFSET)[0]
    struct.pack_into("<H", b, AOCS_OFFSET, aocs | AOCS_RALBAS)  # AOCS.RALBAS, Figure 120

