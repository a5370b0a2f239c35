"""Format NVM (admin 80h, Base 2.1 §5.1.10; NVM CS 1.2 §4.1.3).

* LBAF (CDW10 3:0 with LBAFU 13:12) picks one of the namespace's LBA formats
  (Identify Namespace NLBAF/LBAF: 512 B and 4 KiB, no metadata); another value,
  protection information (PI 7:5), or a namespace size that is not a multiple of
  the new LBA size is Invalid Format.
* SES (11:9): 000b no secure erase, 001b User Data Erase.  Both leave every LBA
  deallocated (DLFEAT: reads return zeroes) by punching the backing file; a User
  Data Erase is also made durable before the command completes.  Cryptographic
  Erase (FNA.CES = 0) and reserved values are Invalid Field.
* NSID: one attached namespace (FNA bit 0 = 0: each namespace formats on its
  own), or FFFFFFFFh: every namespace attached to this controller.
* The allocation bitmap restarts empty with the same granule size in bytes
  (TLBAAG follows the new LBA size); Write Uncorrectable marks are cleared.
* Refused while a controller with the namespace attached is suspended or is
  having its user data changes logged (see ns_mgmt.refuse_under_migration).

The erase (punching the whole backing file and syncing it) runs on a worker
thread (emulator/nvme/offload.py); the new format is set up on the loop when
it returns (``format_namespace``), and the command completes then.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from emulator.nvme.tables import Result
from emulator.nvme.config import LBA_FORMATS
from emulator.nvme.ns_mgmt import notify_changed, refuse_under_migration
from emulator.nvme.offload import offload
from emulator.nvme.spec import (
    BROADCAST_NSID, Command, CommandSpecific, Generic, generic, invalid_field, specific,
)

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.namespace import Namespace

log = logging.getLogger("nvme.format")

SES_NONE, SES_USER_DATA_ERASE, SES_CRYPTO_ERASE = 0b000, 0b001, 0b010


def format_namespace(ns: "Namespace", lba_size: int, ses: int) -> bool:
    """Format ``ns``; True when its LBA format changed."""
    changed = lba_size != ns.lba_size
    ns.reformat(lba_size)
    log.info("namespace %d formatted: %d-byte LBAs, SES %d", ns.nsid, lba_size, ses)
    return changed


def format_nvm(ctrl: "Controller", cmd: Command) -> Result:
    lbaf = (cmd.cdw10 & 0xF) | (((cmd.cdw10 >> 12) & 0x3) << 4)
    pi = (cmd.cdw10 >> 5) & 0x7
    ses = (cmd.cdw10 >> 9) & 0x7
    if lbaf >= len(LBA_FORMATS) or pi:
        raise specific(CommandSpecific.INVALID_FORMAT, f"LBAF {lbaf} PI {pi}")
    if ses not in (SES_NONE, SES_USER_DATA_ERASE):
        raise invalid_field(f"SES {ses:#x} (no cryptographic erase: FNA.CES = 0)")
    namespaces = (ctrl.attached_namespaces() if cmd.nsid == BROADCAST_NSID
                  else [ctrl.namespace(cmd.nsid)])  # Invalid Namespace or Format
    lba_size = LBA_FORMATS[lbaf]
    sub = ctrl.subsystem
    for ns in namespaces:
        if ns.config.size % lba_size:
            raise specific(CommandSpecific.INVALID_FORMAT,
                           f"namespace {ns.nsid}: {ns.config.size} bytes is not a multiple of {lba_size}")
        refuse_under_migration(sub, ns.nsid)

    def erase() -> None:  # on a worker thread: file operations only
        for ns in namespaces:
            ns.punch(0, ns.nsze)
            os.fdatasync(ns.fd)

    def then(_: None) -> Result:  # on the loop: the bitmaps, marks and formats
        live = [ns for ns in namespaces if sub.namespaces.get(ns.nsid) is ns]  # not deleted meanwhile
        if not live:
            raise generic(Generic.INVALID_NAMESPACE, f"NSID {cmd.nsid:#x} deleted during Format NVM")
        for ns in live:
            changed = format_namespace(ns, lba_size, ses)
            for hook in ctrl.observers.on_write:  # the whole namespace changed
                hook(ctrl, ns.nsid, 0, ns.nsze, True)
            if changed:
                notify_changed(sub, sub.attached_controllers(ns.nsid), ns.nsid)
        sub.changed()
        return 0, 0

    # Punching a large namespace full of extents takes seconds in the kernel: off the loop.  What
    # is written meanwhile is erased again by format_namespace (a cheap punch of few extents).
    return offload(ctrl, cmd, erase, then)
