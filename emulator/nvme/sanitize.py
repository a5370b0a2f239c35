"""Sanitize (Base 2.1 §5.1.22 [2.3 §5.2.22]) and its status log (81h).

Block Erase (SANICAP.BES): every namespace of the NVM subsystem is
deallocated (DLFEAT: deallocated blocks read as zeroes).  Overwrite
(SANICAP.OWS): every LBA of every namespace is written once per pass, OWPASS
(CDW10 7:4, 0 = 16) passes, with the 32-bit Overwrite Pattern (CDW11) or its
inversion as the pattern table of Base 2.1 §8.1.24 [2.3 §8.1.26.3] lays
out (:func:`pass_patterns`: the last pass always writes OVRPAT).  Each pass
is made durable (fdatasync) before the next starts, so that every pass
reaches the backing file instead of only the page cache.  The LBAs stay
allocated holding the pattern: NDAS=0 asks that the controller "should"
deallocate, which would make an Overwrite indistinguishable from a Block
Erase.  Crypto Erase is not supported.  No-Deallocate is inhibited
(SANICAP.NDI=1): NDAS=1 is Invalid Field (the No-Deallocate Error Response
Mode, the default).  Write Uncorrectable marks are cleared.

The file work runs on a worker thread (emulator/nvme/offload.py) and the
Sanitize command completes when it is done (the specification completes it
once the operation has started; docs/namespaces.md says why we hold it).
Meanwhile the controller goes on with other admin commands, and the Sanitize
Status log reports the operation in progress (SOS 010b), SPROG advancing
with the bytes written over all passes and OPC counting the passes done; a
second Sanitize is aborted with Sanitize In Progress (Base 2.1 §8.1.24
[2.3 §8.1.26.4.2] g).

Global Data Erased (SSTAT bit 8, Base 2.1 Figure 291 [2.3 Figure 302] and
§8.1.26.3): set when a sanitize completes successfully, cleared when user
data is next written to any namespace of the subsystem (a write-type
command; a deallocation writes no user data).  A subsystem whose history is
unknown (no sanitize recorded) reports it cleared.

TP4159: while any controller of the subsystem is suspended the command is
aborted with Controller Suspended (39h) (§5.1.22: "If one or more
controllers in the NVM subsystem is suspended ...").
"""
from __future__ import annotations

import os
import struct
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from emulator.nvme import fastgen
from emulator.nvme.tables import Result
from emulator.nvme.namespace import file_errors
from emulator.nvme.offload import offload
from emulator.nvme.spec import (
    Command, CommandSpecific, Generic, IoOpcode, generic, invalid_field, specific,
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
_INVERT = 0xFFFFFFFF
# Sanitize Status log: SPROG, SSTAT, SCDW10, then estimated times (Figure 291).
SANITIZE_STATUS = struct.Struct("<HHIIIIIII")
SPROG_DONE = 0xFFFF
# SSTAT: SOS 2:0, OPC (Overwrite Passes Completed) 7:3, GDE bit 8
SSTAT_NEVER, SSTAT_COMPLETED, SSTAT_SANITIZING = 0x0, 0x1, 0x2
SSTAT_OPC_SHIFT = 3
SSTAT_GDE = 1 << 8
NO_ESTIMATE = 0xFFFFFFFF
VENDOR_KEY = "sanitize"  # [SSTAT, SCDW10] of the last sanitize, per controller


@dataclass
class SanitizeRun:
    """A sanitize in progress: written by the worker thread, read by the log page."""
    cdw10: int
    total: int  # bytes to write (or deallocate) over every pass
    done: int = 0
    passes_done: int = 0
    ended: bool = False

    def sprog(self) -> int:
        """SPROG: the fraction done, numerator over 65536 (Figure 291)."""
        return min(self.done * 0x10000 // max(self.total, 1), 0xFFFF)


# Controller -> the sanitize in progress in its subsystem (one entry per controller).
_runs: "weakref.WeakKeyDictionary[Controller, SanitizeRun]" = weakref.WeakKeyDictionary()


def running(ctrl: "Controller") -> SanitizeRun | None:
    run = _runs.get(ctrl)
    return run if run is not None and not run.ended else None


def blocks_io(ctrl: "Controller", opc: int) -> bool:
    """An I/O command the controller aborts with Sanitize In Progress: while a sanitize
    operation is in progress every controller of the NVM subsystem aborts the commands
    not permitted then (Base 2.1 §8.1.24 [2.3 §8.1.26.5]); of the I/O commands only
    Flush is permitted (NVMe 2.0 removed it from the restricted ones)."""
    return opc != IoOpcode.FLUSH and running(ctrl) is not None


def pass_patterns(ovrpat: int, passes: int, oipbp: bool) -> list[int]:
    """The pattern of each Overwrite pass (Base 2.1 §8.1.24 [2.3 §8.1.26.3], pattern table):
    OIPBP=0, every pass OVRPAT; OIPBP=1, each pass the inversion of the one before, the first
    inverted when the pass count is even: the last pass always writes OVRPAT."""
    if not oipbp:
        return [ovrpat] * passes
    first = ovrpat ^ _INVERT if passes % 2 == 0 else ovrpat
    return [first ^ (_INVERT if i % 2 else 0) for i in range(passes)]


def sanitize(ctrl: "Controller", cmd: Command) -> Result:
    sanact = cmd.cdw10 & 0x7
    if sanact not in (SANACT_EXIT_FAILURE, SANACT_BLOCK_ERASE, SANACT_OVERWRITE):
        raise invalid_field(f"SANACT {sanact:#x} not supported (SANICAP)")
    if running(ctrl) is not None:  # §8.1.24 [2.3 §8.1.26.4.2] g: every Sanitize while one runs
        raise generic(Generic.SANITIZE_IN_PROGRESS, "a sanitize operation is in progress")
    if sanact != SANACT_EXIT_FAILURE and cmd.cdw10 & CDW10_NDAS:
        raise invalid_field("No-Deallocate After Sanitize inhibited (SANICAP.NDI)")
    sub = ctrl.subsystem
    if any(c.state.suspended for c in sub.controllers.values()):
        raise specific(CommandSpecific.CONTROLLER_SUSPENDED, "a controller is suspended")
    if sanact == SANACT_EXIT_FAILURE:
        return 0, 0  # never in the failure state
    block_erase = sanact == SANACT_BLOCK_ERASE
    passes = 1 if block_erase else ((cmd.cdw10 >> 4) & 0xF) or 16
    patterns = pass_patterns(cmd.cdw11, passes, bool(cmd.cdw10 & CDW10_OIPBP))
    namespaces = list(sub.namespaces.values())
    size = sum(ns.nsze << ns.lba_shift for ns in namespaces)
    run = SanitizeRun(cmd.cdw10, passes * size)
    for c in sub.controllers.values():
        _runs[c] = run
    fastgen.bump()  # the I/O fast path steps aside (Sanitize In Progress)

    def erase() -> None:  # on a worker thread: file operations and ``run`` only
        try:
            for pattern in patterns:
                for ns in namespaces:
                    if block_erase:
                        ns.punch(0, ns.nsze)
                        run.done += ns.nsze << ns.lba_shift
                    else:
                        write_pattern(ns, pattern, run)
                for ns in namespaces:  # this pass reaches the file before the next one
                    os.fdatasync(ns.fd)
                run.passes_done += 1
        finally:
            run.ended = True

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
        # After the hooks (on_write clears GDE): SOS Sanitized, OPC, GDE set (2.3 §8.1.26.4.2).
        opc = 0 if block_erase else passes
        sstat = SSTAT_COMPLETED | (opc << SSTAT_OPC_SHIFT) | SSTAT_GDE
        for c in sub.controllers.values():
            c.state.vendor[VENDOR_KEY] = [sstat, cmd.cdw10]
            if _runs.get(c) is run:
                del _runs[c]
        fastgen.bump()
        for sync in syncs:
            sync()
        return 0, 0

    return offload(ctrl, cmd, erase, then)


def write_pattern(ns: "Namespace", pattern: int, run: SanitizeRun | None = None) -> None:
    """Write the 32-bit ``pattern`` over every LBA of ``ns`` (file only: safe on a worker thread)."""
    chunk = struct.pack("<I", pattern) * (_PATTERN_CHUNK // 4)
    size = ns.nsze << ns.lba_shift
    with file_errors("sanitize overwrite"):
        for start in range(0, size, _PATTERN_CHUNK):
            view, off = memoryview(chunk)[:min(_PATTERN_CHUNK, size - start)], start
            while view:
                n = os.pwrite(ns.fd, view, off)
                view, off = view[n:], off + n
                if run is not None:
                    run.done += n


def on_write(ctrl: "Controller", nsid: int, slba: int, nlb: int, deallocated: bool) -> None:
    """User data written anywhere in the subsystem clears GDE (Figure 291 SSTAT bit 8)."""
    if deallocated:
        return  # a deallocation writes no user data
    record = ctrl.state.vendor.get(VENDOR_KEY)
    if record is None or not record[0] & SSTAT_GDE:
        return  # the common case: one dictionary look-up per write
    for c in ctrl.subsystem.controllers.values():
        other = c.state.vendor.get(VENDOR_KEY)
        if other is not None:
            other[0] &= ~SSTAT_GDE


def sanitize_status(ctrl: "Controller", cmd: Command) -> bytes:
    run = running(ctrl)
    if run is not None:  # SOS Sanitizing, OPC so far, GDE clear (2.3 §8.1.26.3)
        sprog, scdw10 = run.sprog(), run.cdw10
        opc = run.passes_done if (run.cdw10 & 0x7) == SANACT_OVERWRITE else 0
        sstat = SSTAT_SANITIZING | (opc << SSTAT_OPC_SHIFT)
    else:
        sstat, scdw10 = ctrl.state.vendor.get(VENDOR_KEY, [SSTAT_NEVER, 0])
        sprog = SPROG_DONE
    # ETO (overwrite) and ETCE (crypto) unsupported; Block Erase is immediate.
    head = SANITIZE_STATUS.pack(sprog, sstat, scdw10, NO_ESTIMATE, 0, NO_ESTIMATE,
                                NO_ESTIMATE, NO_ESTIMATE, NO_ESTIMATE)
    return head.ljust(512, b"\0")


def identify_sanicap(ctrl: "Controller", b: bytearray) -> None:
    struct.pack_into("<I", b, SANICAP_OFFSET, SANICAP)
