"""Identify (Base 2.1 §5.1.13; NVM Command Set 1.2 §4.1.5).

The data structures are built as 4096-byte buffers with their fields written
at the offsets the specs give.  Extensions (TP4159 CNS 20h, TP4165 fields)
register their own CNS builders or field patchers.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from emulator.nvme import dbbuf
from emulator.nvme.tables import Result
from emulator.nvme.spec import (
    BROADCAST_NSID, CSI_NVM, Command, Generic, NVME_VERSION, SQES_LOG2,
    CQES_LOG2, generic, invalid_field,
)
from emulator.nvme.features import WCTEMP
from emulator.nvme.aer import AERL
from emulator.nvme.config import LBA_FORMATS
from emulator.nvme.sgl import SGLS_SUPPORTED

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.namespace import Namespace

IDENTIFY_SIZE = 4096
FIRMWARE_REVISION = "0.1"
IEEE_OUI = b"\x00\x00\x00"

# OACS bits (Identify Controller bytes 257:256)
OACS_SECURITY, OACS_FORMAT, OACS_FW, OACS_NS_MGMT = 0x1, 0x2, 0x4, 0x8
OACS_SELF_TEST, OACS_DIRECTIVES, OACS_NVME_MI, OACS_VIRT = 0x10, 0x20, 0x40, 0x80
OACS_DBBUF, OACS_GLSS, OACS_CMD_FEAT_LOCKDOWN, OACS_HMLMS = 0x100, 0x200, 0x400, 0x800

# ONCS bits (bytes 521:520, Base 2.1 Figure 312): Compare, Write Uncorrectable, DSM,
# Write Zeroes, Save/Select, Timestamp, Verify, Copy
ONCS_COMPARE, ONCS_WRITE_UNCORRECTABLE, ONCS_DSM, ONCS_WRITE_ZEROES = 0x1, 0x2, 0x4, 0x8
ONCS_SAVE_SELECT, ONCS_TIMESTAMP, ONCS_VERIFY, ONCS_COPY = 0x10, 0x40, 0x80, 0x100
ONCS = (ONCS_COMPARE | ONCS_WRITE_UNCORRECTABLE | ONCS_DSM | ONCS_WRITE_ZEROES
        | ONCS_SAVE_SELECT | ONCS_TIMESTAMP | ONCS_VERIFY | ONCS_COPY)
# FNA (byte 524) = 0: Format NVM and its secure erase apply to one namespace (bits 0, 1);
# no cryptographic erase (bit 2); NSID FFFFFFFFh supported (bit 3 = 0) and formats all.
FNA = 0x0
# OCFS (bytes 535:534): Copy source range descriptor formats 0h..3h supported
OCFS = 0xF
# Copy limits in Identify Namespace (NVM CS 1.2 Figure 114): MSSRL (bytes 75:74),
# MCL (79:76), MSRC (80, 0's based)
COPY_MSSRL = 0xFFFF
COPY_MSRC = 127

def _ascii(text: str, size: int) -> bytes:
    return text.encode("ascii", "replace")[:size].ljust(size, b" ")


def _put(buf: bytearray, off: int, fmt: str, *values: int) -> None:
    struct.pack_into("<" + fmt, buf, off, *values)


def identify(ctrl: "Controller", cmd: Command) -> Result:
    cns_value = cmd.cdw10 & 0xFF
    builder = ctrl.tables.cns.get(cns_value)
    if builder is None:
        raise invalid_field(f"CNS {cns_value:#x} not supported")
    data = builder(ctrl, cmd)
    ctrl.data_to_host(cmd, data, IDENTIFY_SIZE)
    return 0, 0


def _check_csi(cmd: Command) -> None:
    if (cmd.cdw11 >> 24) & 0xFF != CSI_NVM:
        raise invalid_field("CSI not supported")


def identify_controller(ctrl: "Controller", cmd: Command) -> bytes:
    sub = ctrl.subsystem
    cfg = ctrl.config
    b = bytearray(IDENTIFY_SIZE)
    _put(b, 0, "HH", sub.vendor_id, sub.vendor_id)  # VID, SSVID
    b[4:24] = _ascii(sub.serial, 20)
    b[24:64] = _ascii(sub.model, 40)
    b[64:72] = _ascii(sub.firmware or FIRMWARE_REVISION, 8)
    b[72] = 6  # RAB
    b[73:76] = IEEE_OUI
    # CMIC bit 1 (Base 2.1 §5.1.13.2.1, Figure 312): the NVM subsystem may contain two or
    # more controllers; cleared, it contains only this one.  Linux puts every namespace of a
    # CMIC bit 1 subsystem behind a multipath head disk, an extra block layer pass per I/O.
    b[76] = 0x2 if len(sub.controllers) > 1 else 0
    b[77] = cfg.mdts
    _put(b, 78, "H", cfg.cntlid)
    _put(b, 80, "I", NVME_VERSION)
    _put(b, 92, "I", 0x100 | 0x2000)  # OAES: Namespace Attribute, LBA Status Information Notices
    b[111] = 1  # CNTRLTYPE: I/O controller
    # OACS: Format NVM, Namespace Management, Doorbell Buffer Config where offered
    # (extensions OR in theirs)
    _put(b, 256, "H", OACS_FORMAT | OACS_NS_MGMT | (OACS_DBBUF if dbbuf.supported(ctrl) else 0))
    b[258] = 3  # ACL: 4 concurrent Abort commands (0's based)
    b[259] = AERL
    b[260] = 0x3  # FRMW: slot 1 read only, 1 slot
    b[261] = 0x2 | 0x4 | 0x20  # LPA: CSE log, extended data, Supported Log Pages
    b[262] = 63  # ELPE: 64 Error Information entries
    b[263] = 0  # NPSS: one power state
    _put(b, 266, "HH", WCTEMP, WCTEMP + 30)  # WCTEMP, CCTEMP
    _put(b, 272, "I", 0)  # HMPRE = 0 (Base 2.1 §8.1.12: no HMB in a subsystem with an MMC)
    b[280:296] = sub.total_capacity().to_bytes(16, "little")  # TNVMCAP
    b[296:312] = sub.unallocated_capacity().to_bytes(16, "little")  # UNVMCAP
    b[512] = (SQES_LOG2 << 4) | SQES_LOG2  # SQES
    b[513] = (CQES_LOG2 << 4) | CQES_LOG2  # CQES
    _put(b, 514, "H", 0)  # MAXCMD (fabrics only)
    _put(b, 516, "I", sub.max_nsid())  # NN
    _put(b, 520, "H", ONCS)
    b[524] = FNA
    b[525] = 0x7  # VWC present; Flush with NSID FFFFFFFFh supported
    _put(b, 534, "H", OCFS)
    _put(b, 536, "I", SGLS_SUPPORTED)  # SGLS: SGLs for I/O commands, no alignment requirement
    _put(b, 540, "I", sub.max_nsid())  # MNAN: as many namespaces as NSIDs
    b[768:1024] = sub.nqn.encode()[:255].ljust(256, b"\0")  # SUBNQN
    # Power State 0 descriptor (§5.1.13.2.1 Fig. 313): MP 25 W (centiwatts), ENLAT/EXLAT
    _put(b, 2048, "HxBII", 2500, 0, 10, 10)
    for patch in ctrl.tables.identify_controller:
        patch(ctrl, b)
    return bytes(b)


def _namespace_for_identify(ctrl: "Controller", nsid: int) -> "Namespace | None":
    """None for a valid but inactive NSID; Invalid Namespace for an invalid one."""
    if nsid == 0 or (nsid > ctrl.subsystem.max_nsid() and nsid != BROADCAST_NSID):
        raise generic(Generic.INVALID_NAMESPACE, f"NSID {nsid:#x}")
    if nsid in ctrl.nsids:
        return ctrl.subsystem.namespaces.get(nsid)
    return None


def _allocated_for_identify(ctrl: "Controller", nsid: int) -> "Namespace | None":
    """CNS 11h/12h: an allocated NSID whether attached or not; None when unallocated."""
    if nsid == 0 or nsid > ctrl.subsystem.max_nsid():
        raise generic(Generic.INVALID_NAMESPACE, f"NSID {nsid:#x}")
    return ctrl.subsystem.namespaces.get(nsid)


def _lba_formats(b: bytearray) -> None:
    """NLBAF and the LBA Format list (Figure 117): LBADS, MS=0, RP 0 (best) for 4 KiB."""
    b[25] = len(LBA_FORMATS) - 1  # NLBAF, 0's based
    for i, size in enumerate(LBA_FORMATS):
        rp = 0 if size == 4096 else 1
        _put(b, 128 + 4 * i, "I", ((size.bit_length() - 1) << 16) | (rp << 24))


def namespace_data(ctrl: "Controller", ns: "Namespace") -> bytes:
    """Identify Namespace, NVM Command Set (NVM CS 1.2 Figure 114) for ``ns``."""
    b = bytearray(IDENTIFY_SIZE)
    nuse = ns.nuse()
    _put(b, 0, "QQQ", ns.nsze, ns.nsze, nuse)  # NSZE, NCAP, NUSE
    b[24] = 0x1  # NSFEAT: THINP (NUSE reflects allocation)
    _lba_formats(b)
    b[26] = ns.config.flbas  # FLBAS: the current format, no metadata
    b[30] = 0x1 if ctrl.subsystem.shared(ns.nsid) else 0  # NMIC: may be attached to 2+ ctrls
    b[33] = 0x1 | 0x8  # DLFEAT: deallocated blocks read as zeroes; Write Zeroes DEAC supported
    _put(b, 46, "H", 0)  # NOIOB
    b[48:64] = ns.config.size.to_bytes(16, "little")  # NVMCAP
    # Copy limits: MSSRL, MCL (as many LBAs as MSRC + 1 full ranges), MSRC
    _put(b, 74, "HIB", COPY_MSSRL, COPY_MSSRL * (COPY_MSRC + 1), COPY_MSRC)
    b[104:120] = ns.nguid
    b[120:128] = ns.eui64
    return bytes(b)


def identify_namespace(ctrl: "Controller", cmd: Command) -> bytes:
    if cmd.nsid == BROADCAST_NSID:
        # Capabilities common to all namespaces (Namespace Management supported): formats.
        b = bytearray(IDENTIFY_SIZE)
        b[24] = 0x1
        _lba_formats(b)
        b[33] = 0x1 | 0x8
        _put(b, 74, "HIB", COPY_MSSRL, COPY_MSSRL * (COPY_MSRC + 1), COPY_MSRC)
        return bytes(b)
    ns = _namespace_for_identify(ctrl, cmd.nsid)
    if ns is None:
        return bytes(IDENTIFY_SIZE)
    return namespace_data(ctrl, ns)


def identify_allocated_namespace(ctrl: "Controller", cmd: Command) -> bytes:
    """CNS 11h: Identify Namespace for an allocated NSID, attached or not (Base 2.1 §5.1.13.2.9)."""
    ns = _allocated_for_identify(ctrl, cmd.nsid)
    return bytes(IDENTIFY_SIZE) if ns is None else namespace_data(ctrl, ns)


def _nsid_list(ids: list[int], after: int) -> bytes:
    """A Namespace List (Figure 292): up to 1024 NSIDs greater than ``after``, ascending."""
    if after in (0xFFFFFFFE, BROADCAST_NSID):
        raise generic(Generic.INVALID_NAMESPACE, f"NSID {after:#x} for a namespace list")
    out = [n for n in sorted(ids) if n > after][:1024]
    return struct.pack(f"<{len(out)}I", *out)


def active_nsid_list(ctrl: "Controller", cmd: Command) -> bytes:
    return _nsid_list(list(ctrl.nsids & ctrl.subsystem.namespaces.keys()), cmd.nsid)


def allocated_nsid_list(ctrl: "Controller", cmd: Command) -> bytes:
    """CNS 10h: every allocated NSID of the subsystem above CDW1.NSID."""
    return _nsid_list(list(ctrl.subsystem.namespaces), cmd.nsid)


def _controller_list(ids: list[int], cntid: int) -> bytes:
    """A Controller List (Figure 137): count, then up to 2047 CNTLIDs >= CNTID."""
    out = [c for c in sorted(ids) if c >= cntid][:2047]
    return struct.pack(f"<H{len(out)}H", len(out), *out)


def attached_controller_list(ctrl: "Controller", cmd: Command) -> bytes:
    """CNS 12h: controllers the namespace CDW1.NSID is attached to, from CDW10.CNTID on."""
    ns = _allocated_for_identify(ctrl, cmd.nsid)
    ids = [] if ns is None else ctrl.subsystem.attached_controllers(cmd.nsid)
    return _controller_list(ids, cmd.cdw10 >> 16)


def subsystem_controller_list(ctrl: "Controller", cmd: Command) -> bytes:
    """CNS 13h: every controller of the NVM subsystem, from CDW10.CNTID on."""
    return _controller_list(list(ctrl.subsystem.controllers), cmd.cdw10 >> 16)


def identify_independent_namespace(ctrl: "Controller", cmd: Command) -> bytes:
    """CNS 08h: I/O Command Set Independent Identify Namespace (Base 2.1 §5.1.13.2.5)."""
    b = bytearray(IDENTIFY_SIZE)
    ns = _namespace_for_identify(ctrl, cmd.nsid)
    if ns is None or cmd.nsid == BROADCAST_NSID:
        return bytes(b)
    b[0] = 0  # NSFEAT: not rotational media (bit 4), volatile write cache present (bit 5 = 0)
    b[1] = 0x1 if ctrl.subsystem.shared(ns.nsid) else 0  # NMIC
    _put(b, 10, "HH", 0, 0)  # NVMSETID, ENDGID: no NVM Sets, no Endurance Groups
    b[14] = 0x1  # NSTAT: namespace ready
    return bytes(b)


def io_command_set(ctrl: "Controller", cmd: Command) -> bytes:
    """CNS 1Ch: I/O Command Set data structure; combination 0 is the NVM Command Set alone."""
    b = bytearray(IDENTIFY_SIZE)
    _put(b, 0, "Q", 1 << CSI_NVM)
    return bytes(b)


def ns_id_descriptors(ctrl: "Controller", cmd: Command) -> bytes:
    ns = _namespace_for_identify(ctrl, cmd.nsid)
    if ns is None or cmd.nsid == BROADCAST_NSID:
        raise generic(Generic.INVALID_NAMESPACE, "inactive namespace")
    out = bytearray()
    for nidt, nid in ((0x1, ns.eui64), (0x2, ns.nguid), (0x3, bytes(ns.uuid)),
                      (0x4, bytes([CSI_NVM]))):
        out += bytes([nidt, len(nid), 0, 0]) + nid  # Fig. 315 descriptor
    return bytes(out)


def identify_nvm_namespace(ctrl: "Controller", cmd: Command) -> bytes:
    """I/O Command Set specific Identify Namespace, NVM (NVM CS 1.2 Figure 118)."""
    _check_csi(cmd)
    ns = _namespace_for_identify(ctrl, cmd.nsid)
    b = bytearray(IDENTIFY_SIZE)
    if ns is None or cmd.nsid == BROADCAST_NSID:
        return bytes(b)
    for patch in ctrl.tables.identify_nvm_namespace:
        patch(ctrl, ns, b)
    return bytes(b)


def identify_nvm_controller(ctrl: "Controller", cmd: Command) -> bytes:
    """I/O Command Set specific Identify Controller, NVM (NVM CS 1.2 Figure 120)."""
    _check_csi(cmd)
    b = bytearray(IDENTIFY_SIZE)
    b[0] = 0  # VSL: no Verify size limit (Verify transfers no data)
    b[1] = ctrl.config.mdts  # WZSL: Write Zeroes size limit
    b[3] = 0  # DMRL: no limit on ranges beyond 256
    _put(b, 20, "I", (1 << 16) | (2 << 8))  # VER: NVM Command Set 1.2
    for patch in ctrl.tables.identify_nvm_controller:
        patch(ctrl, b)
    return bytes(b)


def csi_active_nsid_list(ctrl: "Controller", cmd: Command) -> bytes:
    _check_csi(cmd)
    return active_nsid_list(ctrl, cmd)
