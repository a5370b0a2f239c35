"""Sanitize (Base 2.1 §5.1.22 [2.3 §5.2.22]) and its status log (81h).

Block Erase (SANICAP.BES): every namespace of the NVM subsystem is
deallocated (DLFEAT: deallocated blocks read as zeroes).  Overwrite
(SANICAP.OWS): every LBA of every namespace is written with the 32-bit
Overwrite Pattern (CDW11), inverted on alternate passes when OIPBP (CDW10
bit 8) is set; OWPASS (CDW10 7:4, 0 = 16) passes.  Only the last pass is
written (a file has no remanence for earlier passes to remove), and the
LBAs stay allocated holding it: NDAS=0 asks that the controller "should"
deallocate, which would make an Overwrite indistinguishable from a Block
Erase.  Crypto Erase is not supported.  The file work runs on a worker
thread (emulator/nvme/offload.py) and the command completes when it is done,
so no sanitize is ever reported "in progress".  No-Deallocate is inhibited
(SANICAP.NDI=1): NDAS=1 is Invalid Field (the No-Deallocate Error Response
Mode, the default).  Write Uncorrectable marks are cleared.  TP4159: while
any controller of the subsystem is suspended the command is aborted with Controller Suspended (39h) (§5.1.22:
"If one or more controllers in the NVM subsystem is suspended ...").
"""
from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

from emulator.nvme.tables import Result
from emulator.nvme.namespace import file_errors
from emulator.nvme.offload import offload
from emulator.nvme.spec import (
    Command, CommandSpecific, invalid_field, specific,
)

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.namespace import Namespace

# Sanitize Action (CDW10 2:0)
SANACT_EXIT_FAILURE, SANACT_BLOCK_ERASE, SANACT_OVERWRITE = 0b001, 0b010, 0b011
CDW10_OIPBP = 1 << 8  # Overwrite Invert Pattern Between Passes
CDW10_NDAS = 1 << 9  # No-Deallocate After Sanitize
# SANICAP (Identify Controller bytes 331:328): BES bit 1, OWS bit 2, NDI bit 29
SANICAP_OFFSET = 328
SANICAP = (1 << 1) | (1 << 2) | (1 << 29)
_PATTERN_CHUNK = 1 << 20
# Sanitize Status log: SPROG, SSTAT, SCDW10, then estimated times (Figure 291).
SANITIZE_STATUS = struct.Struct("<HHIIIIIII")
SPROG_DONE = 0xFFFF
SSTAT_NEVER, SSTAT_COMPLETED = 0x0, 0x1
NO_ESTIMATE = 0xFFFFFFFF
VENDOR_KEY = "sanitize"  # [SSTAT, SCDW10] of the last sanitize, per controller


def sanitize(ctrl: "Controller", cmd: Command) -> Result:
    sanact = cmd.cdw10 & 0x7
    if sanact not in (SANACT_EXIT_FAILURE, SANACT_BLOCK_ERASE, SANACT_OVERWRITE):
        raise invalid_field(f"SANACT {sanact:#x} not supported (SANICAP)")
    if sanact != SANACT_EXIT_FAILURE and cmd.cdw10 & CDW10_NDAS:
        raise invalid_field("No-Deallocate After Sanitize inhibited (SANICAP.NDI)")
    sub = ctrl.subsystem
    if any(c.state.suspended for c in sub.controllers.values()):
        raise specific(CommandSpecific.CONTROLLER_SUSPENDED, "a controller is suspended")
    if sanact == SANACT_EXIT_FAILURE:
        return 0, 0  # never in the failure state
    passes = ((cmd.cdw10 >> 4) & 0xF) or 16
    pattern = cmd.cdw11
    if cmd.cdw10 & CDW10_OIPBP and passes % 2 == 0:
        pattern ^= 0xFFFFFFFF  # the last of an even number of alternating passes
    block_erase = sanact == SANACT_BLOCK_ERASE
    namespaces = list(sub.namespaces.values())

    def erase() -> None:  # on a worker thread: file operations only
        for ns in namespaces:
            if block_erase:
                ns.punch(0, ns.nsze)
            else:
                write_pattern(ns, pattern)
            os.fdatasync(ns.fd)

    def then(_: None) -> Result:
        syncs = []
        for ns in namespaces:
            if block_erase:
                ns.allocation.mark_deallocated(0, ns.nsze)
            else:
                ns.allocation.mark_allocated(0, ns.nsze)
            ns.uncorrectable.clear_all()
            syncs.append(ns.allocation.save)  # the bitmap's words that changed
        for attached in ctrl.attached_namespaces():  # user data changed by this controller's command
            for hook in ctrl.observers.on_write:
                hook(ctrl, attached.nsid, 0, attached.nsze, block_erase)
        sstat = SSTAT_COMPLETED | ((passes if not block_erase else 0) << 3)  # Overwrite passes 7:3
        for c in sub.controllers.values():
            c.state.vendor[VENDOR_KEY] = [sstat, cmd.cdw10]
        for sync in syncs:
            sync()
        return 0, 0

    return offload(ctrl, cmd, erase, then)


def write_pattern(ns: "Namespace", pattern: int) -> None:
    """Write the 32-bit ``pattern`` over every LBA of ``ns`` (file only: safe on a worker thread)."""
    chunk = struct.pack("<I", pattern) * (_PATTERN_CHUNK // 4)
    size = ns.nsze << ns.lba_shift
    with file_errors("sanitize overwrite"):
        for start in range(0, size, _PATTERN_CHUNK):
            view, off = memoryview(chunk)[:min(_PATTERN_CHUNK, size - start)], start
            while view:
                n = os.pwrite(ns.fd, view, off)
                view, off = view[n:], off + n


def sanitize_status(ctrl: "Controller", cmd: Command) -> bytes:
    sstat, scdw10 = ctrl.state.vendor.get(VENDOR_KEY, [SSTAT_NEVER, 0])
    # ETO (overwrite) and ETCE (crypto) unsupported; Block Erase is immediate.
    head = SANITIZE_STATUS.pack(SPROG_DONE, sstat, scdw10, NO_ESTIMATE, 0, NO_ESTIMATE,
                                NO_ESTIMATE, NO_ESTIMATE, NO_ESTIMATE)
    return head.ljust(512, b"\0")


def identify_sanicap(ctrl: "Controller", b: bytearray) -> None:
    struct.pack_into("<I", b, SANICAP_OFFSET, SANICAP)
