"""Get Log Page (Base 2.1 §5.1.12)."""
from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING

from emulator.nvme import aer
from emulator.nvme.tables import Result
from emulator.nvme.identify import FIRMWARE_REVISION
from emulator.nvme.spec import (
    FID, LID, AdminOpcode, Command, CommandSpecific, IoOpcode, invalid_field, specific,
)

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller

# Which asynchronous event type a log page read (RAE=0) re-arms.
LOG_EVENT_TYPE = {LID.ERROR_INFORMATION: aer.AET_ERROR, LID.SMART_HEALTH: aer.AET_SMART,
                  LID.CHANGED_NAMESPACES: aer.AET_NOTICE,
                  LID.LBA_STATUS_INFORMATION: aer.AET_NOTICE}


def get_log_page(ctrl: "Controller", cmd: Command) -> Result:
    lid = cmd.cdw10 & 0xFF
    rae = bool(cmd.cdw10 & (1 << 15))
    numd = ((cmd.cdw10 >> 16) | ((cmd.cdw11 & 0xFFFF) << 16)) + 1  # 0's based
    offset = cmd.cdw12 | (cmd.cdw13 << 32)
    builder = ctrl.tables.log_pages.get(lid)
    if builder is None:
        raise specific(CommandSpecific.INVALID_LOG_PAGE, f"LID {lid:#x}")
    if offset & 0x3:
        raise invalid_field("log page offset not dword aligned")
    if numd * 4 > ctrl.max_transfer:  # MDTS caps every data transfer; checked before building
        raise invalid_field(f"log page of {numd * 4} bytes exceeds MDTS")
    data = builder(ctrl, cmd)
    if offset > len(data):
        raise invalid_field("log page offset beyond the log")
    length = numd * 4
    ctrl.data_to_host(cmd, data[offset:offset + length], length)
    if not rae and lid in LOG_EVENT_TYPE:
        aer.clear_type(ctrl, LOG_EVENT_TYPE[lid])
    return 0, 0


def supported_log_pages(ctrl: "Controller", cmd: Command) -> bytes:
    entries = [0] * 256
    for lid in ctrl.tables.log_pages:
        entries[lid] = 0x1  # LSUPP
    return struct.pack("<256I", *entries)


def error_information(ctrl: "Controller", cmd: Command) -> bytes:
    out = bytearray(64 * 64)
    for i, (count, sqid, cid, status, lba, nsid) in enumerate(ctrl.state.error_log[:64]):
        # Fig. 206: Error Count, SQID, CID, Status (with phase bit 0), PEL, LBA, NSID
        struct.pack_into("<QHHHHQI", out, i * 64, count, sqid, cid, status << 1, 0xFFFF, lba, nsid)
    return bytes(out)


def smart_health(ctrl: "Controller", cmd: Command) -> bytes:
    b = bytearray(512)
    st = ctrl.stats
    b[0] = 0  # Critical Warning
    struct.pack_into("<H", b, 1, 0x13E)  # Composite Temperature: 318 K
    b[3], b[4], b[5] = 100, 10, 0  # Available Spare, threshold, Percentage Used
    units = lambda n: (n + 999) // 1000  # noqa: E731 - thousands of 512-byte units, rounded up
    hours = int((time.monotonic() - ctrl.started) // 3600)
    for off, value in ((32, units(st["data_units_read"])), (48, units(st["data_units_written"])),
                       (64, st["host_read_commands"]), (80, st["host_write_commands"]),
                       (128, hours), (176, ctrl.state.error_count)):
        b[off:off + 16] = value.to_bytes(16, "little")
    return bytes(b)


def firmware_slot(ctrl: "Controller", cmd: Command) -> bytes:
    b = bytearray(512)
    b[0] = 0x1  # AFI: slot 1 active
    rev = ctrl.subsystem.firmware or FIRMWARE_REVISION
    b[8:16] = rev.encode()[:8].ljust(8, b" ")
    return bytes(b)


# Commands Supported and Effects (Fig. 211): CSUPP bit 0, LBCC bit 1, NCC bit 2,
# NIC bit 3, CCC bit 4; CSE (bits 18:16) 001b: no other command to any namespace meanwhile
CSUPP, LBCC, NCC, NIC, CCC = 0x1, 0x2, 0x4, 0x8, 0x10
CSE_ONE_NS, CSE_ALL = 1 << 16, 2 << 16
IO_EFFECTS = {IoOpcode.WRITE: LBCC, IoOpcode.WRITE_ZEROES: LBCC, IoOpcode.DATASET_MANAGEMENT: LBCC,
              IoOpcode.WRITE_UNCORRECTABLE: LBCC, IoOpcode.COPY: LBCC}
ADMIN_EFFECTS = {AdminOpcode.NS_MANAGEMENT: NIC | NCC, AdminOpcode.NS_ATTACHMENT: NIC,
                 AdminOpcode.FORMAT_NVM: LBCC | NCC | NIC | CSE_ONE_NS,
                 AdminOpcode.SANITIZE: LBCC | CSE_ALL}


def commands_supported_effects(ctrl: "Controller", cmd: Command) -> bytes:
    acs = [0] * 256
    iocs = [0] * 256
    for opc in ctrl.tables.admin:
        if ctrl.admin_available(opc):
            acs[opc] = CSUPP | ADMIN_EFFECTS.get(opc, 0)
    for opc in ctrl.tables.io:
        iocs[opc] = CSUPP | IO_EFFECTS.get(opc, 0)
    return struct.pack("<256I256I", *acs, *iocs) + bytes(2048)


# Feature Identifiers Supported and Effects (LID 12h, Base 2.1 Get Log Page):
# 256 dwords indexed by FID.  Bit 0 FSUPP, bits 4:1 effects (UDCC, NCC, NIC,
# CCC), bit 19 USS, bits 31:20 FSP, the scope: NSCPE 20, CSCPE 21, NSETSCPE 22,
# EGSCPE 23, DSCPE 24, NSSCPE 25, CDQSCP 26 (Controller Data Queue, TP4159).
FSUPP = 0x1
FSP_NSCPE, FSP_CSCPE, FSP_CDQSCP = 1 << 20, 1 << 21, 1 << 26


def feature_identifiers_supported_effects(ctrl: "Controller", cmd: Command) -> bytes:
    entries = [0] * 256
    for fid, spec in ctrl.tables.features.items():
        if fid == FID.CONTROLLER_DATA_QUEUE:
            if not ctrl.config.is_mmc:
                continue  # Feature 21h exists on MMCs only (Invalid Field elsewhere)
            entries[fid] = FSUPP | FSP_CDQSCP  # one value per CDQ
        else:
            entries[fid] = FSUPP | (FSP_NSCPE if spec.ns_specific else FSP_CSCPE)
    return struct.pack("<256I", *entries)
