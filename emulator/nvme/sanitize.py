"""A minimal Sanitize (Base 2.1 §5.1.22 [2.3 §5.2.22]) and its status log (81h).

Only Block Erase is supported (SANICAP.BES): every namespace of the NVM
subsystem is deallocated (DLFEAT: deallocated blocks read as zeroes), at
once, so no sanitize is ever "in progress".  No-Deallocate is inhibited
(SANICAP.NDI=1): NDAS=1 is Invalid Field (the No-Deallocate Error Response
Mode, the default).  TP4159: while any controller of the subsystem is
suspended the command is aborted with Controller Suspended (39h) (§5.1.22:
"If one or more controllers in the NVM subsystem is suspended ...").
"""
from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

from emulator.nvme.controller import Result, admin_command
from emulator.nvme.identify import CTRL_PATCHERS
from emulator.nvme.logpages import log_page
from emulator.nvme.offload import offload
from emulator.nvme.spec import (
    LID, AdminOpcode, Command, CommandSpecific, invalid_field, specific,
)

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller

# Sanitize Action (CDW10 2:0)
SANACT_EXIT_FAILURE, SANACT_BLOCK_ERASE = 0b001, 0b010
CDW10_NDAS = 1 << 9  # No-Deallocate After Sanitize
# SANICAP (Identify Controller bytes 331:328): BES bit 1, NDI bit 29
SANICAP_OFFSET = 328
SANICAP = (1 << 1) | (1 << 29)
# Sanitize Status log: SPROG, SSTAT, SCDW10, then estimated times (Figure 291).
SANITIZE_STATUS = struct.Struct("<HHIIIIIII")
SPROG_DONE = 0xFFFF
SSTAT_NEVER, SSTAT_COMPLETED = 0x0, 0x1
NO_ESTIMATE = 0xFFFFFFFF
VENDOR_KEY = "sanitize"  # [SSTAT, SCDW10] of the last sanitize, per controller


@admin_command(AdminOpcode.SANITIZE)
def sanitize(ctrl: "Controller", cmd: Command) -> Result:
    sanact = cmd.cdw10 & 0x7
    if sanact not in (SANACT_EXIT_FAILURE, SANACT_BLOCK_ERASE):
        raise invalid_field(f"SANACT {sanact:#x} not supported (SANICAP)")
    if sanact == SANACT_BLOCK_ERASE and cmd.cdw10 & CDW10_NDAS:
        raise invalid_field("No-Deallocate After Sanitize inhibited (SANICAP.NDI)")
    sub = ctrl.subsystem
    if any(c.state.suspended for c in sub.controllers.values()):
        raise specific(CommandSpecific.CONTROLLER_SUSPENDED, "a controller is suspended")
    if sanact == SANACT_EXIT_FAILURE:
        return 0, 0  # never in the failure state
    namespaces = list(sub.namespaces.values())

    def erase() -> None:  # on a worker thread: file operations only
        for ns in namespaces:
            ns.punch(0, ns.nsze)
            os.fdatasync(ns.fd)

    def then(_: None) -> Result:
        syncs = []
        for ns in namespaces:
            ns.allocation.mark_deallocated(0, ns.nsze)
            syncs.append(ns.allocation.save)  # the bitmap's words that changed
        for attached in ctrl.attached_namespaces():  # user data changed by this controller's command
            for hook in ctrl.observers.on_write:
                hook(ctrl, attached.nsid, 0, attached.nsze, True)
        for c in sub.controllers.values():
            c.state.vendor[VENDOR_KEY] = [SSTAT_COMPLETED, cmd.cdw10]
        for sync in syncs:
            sync()
        return 0, 0

    return offload(ctrl, cmd, erase, then)


@log_page(LID.SANITIZE_STATUS)
def sanitize_status(ctrl: "Controller", cmd: Command) -> bytes:
    sstat, scdw10 = ctrl.state.vendor.get(VENDOR_KEY, [SSTAT_NEVER, 0])
    # ETO (overwrite) and ETCE (crypto) unsupported; Block Erase is immediate.
    head = SANITIZE_STATUS.pack(SPROG_DONE, sstat, scdw10, NO_ESTIMATE, 0, NO_ESTIMATE,
                                NO_ESTIMATE, NO_ESTIMATE, NO_ESTIMATE)
    return head.ljust(512, b"\0")


def _sanicap(ctrl: "Controller", b: bytearray) -> None:
    struct.pack_into("<I", b, SANICAP_OFFSET, SANICAP)


CTRL_PATCHERS.append(_sanicap)
