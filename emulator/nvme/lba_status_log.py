"""What OACS.GLSS (Get LBA Status 10h/11h) brings along (NVM CS 1.2 §5.2.2):
the LBA Status Information log (0Eh) and the LBA Status Information
Attributes feature (15h).  Log Page Attributes already advertise extended
Get Log Page offsets.

Log 0Eh (NVM CS 1.2 Figure 201): a 16-byte header (LSLPLEN: length of the
log, NLSLNE: namespace elements, ESTULB: estimate of unrecoverable LBAs,
LSGC: generation counter) and one element per attached namespace holding
Write Uncorrectable marks: NEID (the NSID), NLRD range descriptors, RATYPE
11h (tracked), each descriptor RSLBA and RNLB.  Choices: RNLB is a count of
LBAs (not 0's based); LSGC counts mark changes since the emulator started.
Write Uncorrectable raises the LBA Status Information Alert (emulator.nvme.nvm_cmds).
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from emulator.nvme.tables import FeatureSpec
from emulator.nvme.identify import OACS_GLSS
from emulator.nvme.lba_status import ATYPE_TRACKED_UNRECOVERABLE
from emulator.nvme.spec import Command

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller

FID_LBA_STATUS_INFO_ATTRIBUTES = 0x15  # LSIRI 15:0, LSIPI 31:16 (Base 2.1 Figure 418)
LOG_HEADER = struct.Struct("<III2xH")  # LSLPLEN, NLSLNE, ESTULB, reserved, LSGC
NS_ELEMENT = struct.Struct("<IIB7x")  # NEID, NLRD, RATYPE
RANGE_DESCRIPTOR = struct.Struct("<QI4x")  # RSLBA, RNLB


def lba_status_information(ctrl: "Controller", cmd: Command) -> bytes:
    body = bytearray()
    elements = estimate = generation = 0
    for ns in ctrl.attached_namespaces():
        generation += ns.uncorrectable.generation
        ranges = ns.uncorrectable.ranges()
        if not ranges:
            continue
        elements += 1
        body += NS_ELEMENT.pack(ns.nsid, len(ranges), ATYPE_TRACKED_UNRECOVERABLE)
        for s, e in ranges:
            body += RANGE_DESCRIPTOR.pack(s, min(e - s, 0xFFFFFFFF))
            estimate += e - s
    length = LOG_HEADER.size + len(body)
    return LOG_HEADER.pack(length, elements, min(estimate, 0xFFFFFFFF), generation & 0xFFFF) + bytes(body)


def identify_glss(ctrl: "Controller", b: bytearray) -> None:
    oacs = struct.unpack_from("<H", b, 256)[0]
    struct.pack_into("<H", b, 256, oacs | OACS_GLSS)


LBA_STATUS_INFO_FEATURE = FeatureSpec(writable=0xFFFFFFFF)  # FID_LBA_STATUS_INFO_ATTRIBUTES
