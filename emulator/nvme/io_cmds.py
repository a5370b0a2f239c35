"""NVM Command Set I/O commands (NVM CS 1.2 §3): Read, Write, Flush,
Write Zeroes, Dataset Management."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from emulator.nvme.tables import Result
from emulator.nvme.namespace import sync_files
from emulator.nvme.offload import offload, sync_shared
from emulator.nvme.spec import (
    BROADCAST_NSID, Command, Generic, MediaError, generic, invalid_field, media,
)

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.namespace import Namespace

DSM_RANGE = struct.Struct("<IIQ")  # Context Attributes, Length (LBAs), SLBA (Fig. 64)
# A deallocation this large (bytes) punches its holes on a worker thread (emulator/nvme/offload.py).
OFFLOAD_DEALLOCATE = 64 << 20


def _rw_args(ctrl: "Controller", cmd: Command) -> tuple["Namespace", int, int]:
    ns = ctrl.namespace(cmd.nsid)
    slba = cmd.cdw10 | (cmd.cdw11 << 32)
    nlb = (cmd.cdw12 & 0xFFFF) + 1  # 0's based NLB
    if not ns.in_range(slba, nlb):
        raise generic(Generic.LBA_OUT_OF_RANGE, f"LBA {slba}+{nlb} > {ns.nsze}")
    return ns, slba, nlb


def _notify_write(ctrl: "Controller", ns: "Namespace", slba: int, nlb: int,
                  deallocated: bool) -> None:
    for hook in ctrl.observers.on_write:
        hook(ctrl, ns.nsid, slba, nlb, deallocated)


def _data_args(ctrl: "Controller", cmd: Command) -> tuple["Namespace", int, int, int]:
    ns, slba, nlb = _rw_args(ctrl, cmd)
    length = nlb << ns.lba_shift
    if length > ctrl.max_transfer:
        raise invalid_field("transfer exceeds MDTS")  # Identify Controller MDTS
    return ns, slba, nlb, length


def read(ctrl: "Controller", cmd: Command) -> Result:
    ns, slba, nlb, length = _data_args(ctrl, cmd)
    if ns.uncorrectable and ns.uncorrectable.overlaps(slba, nlb):  # Write Uncorrectable marks
        raise media(MediaError.UNRECOVERED_READ_ERROR, f"LBA {slba}+{nlb} uncorrectable")
    ns.read_into(slba, ctrl.data_views(cmd, length, to_host=True))
    ctrl.stats["host_read_commands"] += 1
    ctrl.stats["data_units_read"] += length >> 9
    return 0, 0


def write(ctrl: "Controller", cmd: Command) -> Result:
    ns, slba, nlb, length = _data_args(ctrl, cmd)
    ns.write_from(slba, nlb, ctrl.data_views(cmd, length, to_host=False))
    if cmd.cdw12 & (1 << 30):  # FUA
        ns.flush()
    ctrl.stats["host_write_commands"] += 1
    ctrl.stats["data_units_written"] += length >> 9
    _notify_write(ctrl, ns, slba, nlb, False)
    return 0, 0


def flush(ctrl: "Controller", cmd: Command) -> Result:
    if cmd.nsid == BROADCAST_NSID:  # VWC bits 2:1 = 11b
        fds = [fd for ns in ctrl.attached_namespaces() for fd in ns.flush_files()]
    else:
        fds = ctrl.namespace(cmd.nsid).flush_files()
    # fdatasync can take long on a busy disk: off the loop, one sync for the Flushes queued meanwhile
    return sync_shared(ctrl, cmd, fds, sync_files)


def write_zeroes(ctrl: "Controller", cmd: Command) -> Result:
    ns, slba, nlb = _rw_args(ctrl, cmd)
    if (nlb << ns.lba_shift) > ctrl.max_transfer:
        raise invalid_field("Write Zeroes exceeds WZSL")
    deac = bool(cmd.cdw12 & (1 << 25))
    ns.write_zeroes(slba, nlb, deallocate=deac)
    _notify_write(ctrl, ns, slba, nlb, deac)
    return 0, 0


def dataset_management(ctrl: "Controller", cmd: Command) -> Result:
    ns = ctrl.namespace(cmd.nsid)
    nr = (cmd.cdw10 & 0xFF) + 1  # 0's based Number of Ranges
    raw = ctrl.data_from_host(cmd, nr * DSM_RANGE.size)
    ranges = [DSM_RANGE.unpack_from(raw, i * DSM_RANGE.size) for i in range(nr)]
    for _, length, slba in ranges:
        if not ns.in_range(slba, length):
            raise generic(Generic.LBA_OUT_OF_RANGE, f"DSM range {slba}+{length}")
    if not cmd.cdw11 & 0x4:  # AD: Attribute - Deallocate
        return 0, 0
    todo = [(slba, length) for _, length, slba in ranges if length]

    def punch() -> None:
        for slba, length in todo:
            ns.punch(slba, length)

    def then(_: None) -> Result:
        for slba, length in todo:
            ns.allocation.mark_deallocated(slba, length)
            if ns.uncorrectable:
                ns.uncorrectable.clear(slba, length)  # deallocated: no longer uncorrectable
            _notify_write(ctrl, ns, slba, length, True)
        return 0, 0

    if sum(n for _, n in todo) << ns.lba_shift >= OFFLOAD_DEALLOCATE:
        return offload(ctrl, cmd, punch, then)  # many extents can take seconds in the kernel
    punch()
    return then(None)
