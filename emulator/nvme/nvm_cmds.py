"""NVM Command Set I/O commands beyond the data path (NVM CS 1.2 §3.3):
Write Uncorrectable (04h), Compare (05h), Verify (0Ch) and Copy (19h).

* Write Uncorrectable marks LBAs (emulator.nvme.uncorrectable); reads, Compare,
  Verify and Copy sources that touch one fail with Unrecovered Read Error
  (SCT 2h, SC 81h) until the LBA is written again.  The LBAs count as
  allocated (NVM CS §4.2.1: written by a Write Uncorrectable).  Each
  controller the namespace is attached to gets an LBA Status Information
  Alert (Notice 05h, log 0Eh) when Asynchronous Event Configuration bit 13
  enables it; LSIRI/LSIPI (Feature 15h) do not delay it.
* Compare reads the LBAs and compares them with the host buffer: Compare
  Failure (SCT 2h, SC 85h) on a difference.  MDTS applies.
* Verify checks the range and the marks; it transfers no data (VSL = 0).
* Copy: up to MSRC + 1 ranges, each at most MSSRL LBAs, MCL LBAs in all
  (Identify Namespace), else Command Size Limit Exceeded (SCT 1h, 83h).
  Sources in another namespace (formats 2h/3h) must be attached to this
  controller (Invalid Namespace or Format) and share the destination's LBA
  size (Incompatible Namespace or Format, 85h).  A source range that overlaps
  the destination range is Overlapping I/O Range (87h).  Every check happens
  before any byte moves.  A copy of ``copy.OFFLOAD_COPY`` bytes or more moves
  them on a worker thread (emulator/nvme/offload.py); a full file system is
  Capacity Exceeded.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.nvme import copy as copier
from emulator.nvme.tables import Result
from emulator.nvme.identify import COPY_MSRC, COPY_MSSRL
from emulator.nvme.lba_status_log import lba_status_changed
from emulator.nvme.io_cmds import _data_args, _notify_write, _rw_args
from emulator.nvme.namespace import file_errors
from emulator.nvme.offload import offload
from emulator.nvme.spec import (
    Command, Generic, MediaError, NvmCommandSpecific, NvmeError, SCT, generic,
    invalid_field, media,
)

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.namespace import Namespace


def check_readable(ns: "Namespace", slba: int, nlb: int) -> None:
    if ns.uncorrectable.overlaps(slba, nlb):
        raise media(MediaError.UNRECOVERED_READ_ERROR, f"namespace {ns.nsid}: LBA {slba}+{nlb} uncorrectable")


def _nvm_specific(sc: NvmCommandSpecific, msg: str) -> NvmeError:
    return NvmeError(SCT.COMMAND_SPECIFIC, sc, msg=msg)


def write_uncorrectable(ctrl: "Controller", cmd: Command) -> Result:
    ns, slba, nlb = _rw_args(ctrl, cmd)
    ns.uncorrectable.mark(slba, nlb)
    ns.allocation.mark_allocated(slba, nlb)
    _notify_write(ctrl, ns, slba, nlb, False)
    sub = ctrl.subsystem
    for cntlid in sub.attached_controllers(ns.nsid):  # log 0Eh changed for each of them
        lba_status_changed(sub.controllers[cntlid])
    return 0, 0


def compare(ctrl: "Controller", cmd: Command) -> Result:
    ns, slba, nlb, length = _data_args(ctrl, cmd)
    check_readable(ns, slba, nlb)
    stored = bytearray(length)
    ns.read_into(slba, [memoryview(stored)])
    if ctrl.data_from_host(cmd, length) != stored:
        raise media(MediaError.COMPARE_FAILURE, f"namespace {ns.nsid}: LBA {slba}+{nlb} differs")
    return 0, 0


def verify(ctrl: "Controller", cmd: Command) -> Result:
    ns, slba, nlb = _rw_args(ctrl, cmd)
    check_readable(ns, slba, nlb)
    return 0, 0


def copy(ctrl: "Controller", cmd: Command) -> Result:
    dst = ctrl.namespace(cmd.nsid)
    sdlba = cmd.cdw10 | (cmd.cdw11 << 32)
    count = (cmd.cdw12 & 0xFF) + 1  # NR, 0's based
    desfmt = (cmd.cdw12 >> 8) & 0xF
    if desfmt not in copier.DESCRIPTOR_FORMATS:
        raise invalid_field(f"Copy descriptor format {desfmt:#x}")
    if (cmd.cdw12 >> 12) & 0xF or (cmd.cdw12 >> 26) & 0xF:
        raise invalid_field("PRINFOR/PRINFOW: no protection information")
    if count > COPY_MSRC + 1:
        raise _nvm_specific(NvmCommandSpecific.COMMAND_SIZE_LIMIT_EXCEEDED, f"{count} ranges > MSRC")
    entry = copier.DESCRIPTOR_FORMATS[desfmt][0]
    ranges = copier.parse_ranges(ctrl.data_from_host(cmd, count * entry), desfmt, count, cmd.nsid)
    total = sum(n for _, _, n in ranges)
    if any(n > COPY_MSSRL for _, _, n in ranges) or total > COPY_MSSRL * (COPY_MSRC + 1):
        raise _nvm_specific(NvmCommandSpecific.COMMAND_SIZE_LIMIT_EXCEEDED, "range longer than MSSRL/MCL")
    if not dst.in_range(sdlba, total):
        raise generic(Generic.LBA_OUT_OF_RANGE, f"destination {sdlba}+{total} > {dst.nsze}")
    sources = []
    for snsid, slba, nlb in ranges:
        src = ctrl.namespace(snsid)  # Invalid Namespace or Format
        if src.lba_size != dst.lba_size:
            raise _nvm_specific(NvmCommandSpecific.INCOMPATIBLE_NAMESPACE_OR_FORMAT,
                                f"namespace {snsid} LBA size {src.lba_size} != {dst.lba_size}")
        if not src.in_range(slba, nlb):
            raise generic(Generic.LBA_OUT_OF_RANGE, f"source {snsid}:{slba}+{nlb} > {src.nsze}")
        if src is dst and slba < sdlba + total and sdlba < slba + nlb:
            raise _nvm_specific(NvmCommandSpecific.OVERLAPPING_IO_RANGE,
                                f"source {slba}+{nlb} overlaps destination {sdlba}+{total}")
        check_readable(src, slba, nlb)
        sources.append((src, slba, nlb))
    shift = dst.lba_shift
    fua = bool(cmd.cdw12 & (1 << 30))
    pieces = [(src.fd, slba << shift, nlb << shift) for src, slba, nlb in sources]

    def move() -> None:  # file operations only: may run on a worker thread
        with file_errors("copy"):
            copier.copy_ranges(pieces, dst.fd, sdlba << shift, sync=fua)

    def then(_: None) -> Result:  # on the loop
        if ctrl.subsystem.namespaces.get(dst.nsid) is not dst or dst.lba_shift != shift:
            raise generic(Generic.INVALID_NAMESPACE, f"namespace {dst.nsid} deleted or formatted during Copy")
        dst.allocation.mark_allocated(sdlba, total)
        if dst.uncorrectable:
            dst.uncorrectable.clear(sdlba, total)
        if fua:
            dst.flush()  # the bitmap (the data is synced already)
        _notify_write(ctrl, dst, sdlba, total, False)
        return 0, 0

    if total << shift >= copier.OFFLOAD_COPY:
        return offload(ctrl, cmd, move, then)  # gigabytes of copying take seconds
    move()
    return then(None)
