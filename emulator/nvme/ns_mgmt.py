"""Namespace Management (0Dh) and Namespace Attachment (15h) (Base 2.1 §5.1.20, §5.1.21),
the Changed Namespace List log (04h) and the Namespace Attribute Notices event.

* Create (SEL 0h): the host specifies NSZE, NCAP, FLBAS and NMIC (Figure 297 fields of
  the Identify Namespace layout).  The namespace is carved from the subsystem's NVM
  capacity (TNVMCAP/UNVMCAP), gets the lowest free NSID up to NN, a sparse backing
  file ``ns<NSID>.img`` in the state directory and its allocation bitmap.  It starts
  detached.  Choices: NCAP must equal NSZE (a namespace reserves its whole size);
  protection information, ANA groups, NVM Sets and Endurance Groups are not
  supported, so DPS, ANAGRPID, NVMSETID and ENDGID must be 0 (Invalid Field).
* Delete (SEL 1h, NSID or FFFFFFFFh for all): detached from every controller, file
  and sidecars removed.
* Attach / Detach: the Controller List (Figure 137) names the controllers.
* Each controller whose attached namespaces changed records the NSID in its Changed
  Namespace List and, when Asynchronous Event Configuration bit 8 enables it, gets
  a Notice event (AEI 00h, log 04h); Linux then rescans and the block device
  appears or goes away.

Refused under a running migration (TP4159): deleting, detaching or formatting a
namespace attached to a suspended controller (Controller Suspended, 39h), or to a
controller whose user data changes are being logged into a CDQ (Command Sequence
Error): the migration would silently lose the namespace or its data.
"""
from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Iterable

from emulator.nvme import aer, fastgen
from emulator.nvme.features import AEC_NS_ATTRIBUTE_NOTICES
from emulator.nvme.tables import Result
from emulator.nvme.config import LBA_FORMATS, NamespaceConfig, default_tlbaag
from emulator.nvme.namespace import Namespace
from emulator.nvme.spec import (
    BROADCAST_NSID, FID, LID, Command, CommandSpecific, Generic, generic,
    invalid_field, specific,
)

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.subsystem.subsystem import Subsystem

log = logging.getLogger("nvme.nsmgmt")

SEL_CREATE, SEL_DELETE = 0x0, 0x1  # Namespace Management CDW10 3:0
SEL_ATTACH, SEL_DETACH = 0x0, 0x1  # Namespace Attachment CDW10 3:0
AEI_NS_ATTRIBUTE_CHANGED = 0x00  # Notice event information (Figure 150)
CHANGED_KEY = "changed_ns"  # ControllerState.vendor: NSIDs changed since the log was read
CHANGED_MAX = 1024  # Figure 208: more than 1024 changes -> first entry FFFFFFFFh
# Host-specified fields of the create data structure (Identify Namespace layout)
CREATE_NSZE_NCAP = struct.Struct("<QQ")
OFF_FLBAS, OFF_DPS, OFF_NMIC = 26, 29, 30
CREATE_ZERO_FIELDS = ((92, "I", "ANAGRPID"), (100, "H", "NVMSETID"), (102, "H", "ENDGID"))


# ------------------------------------------------------------------ events
def notify_changed(sub: "Subsystem", cntlids: Iterable[int], nsid: int) -> None:
    """Record ``nsid`` in each controller's Changed Namespace List and raise the notice."""
    for cntlid in cntlids:
        ctrl = sub.controllers.get(cntlid)
        if ctrl is None:
            continue
        changed = ctrl.state.vendor.setdefault(CHANGED_KEY, [])
        if changed != [BROADCAST_NSID] and nsid not in changed:
            changed.append(nsid)
            if len(changed) > CHANGED_MAX:
                changed[:] = [BROADCAST_NSID]
        post_notice(ctrl, AEC_NS_ATTRIBUTE_NOTICES, AEI_NS_ATTRIBUTE_CHANGED, LID.CHANGED_NAMESPACES)


def post_notice(ctrl: "Controller", aec_bit: int, aei: int, lid: int) -> None:
    """A Notice event, when Asynchronous Event Configuration enables it and none is pending."""
    if not ctrl.state.features.get(FID.ASYNC_EVENT_CONFIG, 0) & aec_bit:
        return
    dw0 = aer.AET_NOTICE | (aei << 8) | (lid << 16)
    if [dw0, 0] not in ctrl.state.aer.pending:  # one outstanding notice covers the log
        aer.post_event(ctrl, aer.AET_NOTICE, aei, lid)


def changed_namespace_list(ctrl: "Controller", cmd: Command) -> bytes:
    """Log 04h (Figure 208); a read with RAE=0 clears the list."""
    changed = ctrl.state.vendor.get(CHANGED_KEY, [])
    data = struct.pack(f"<{len(changed)}I", *changed).ljust(4096, b"\0")
    if not cmd.cdw10 & (1 << 15):
        ctrl.state.vendor[CHANGED_KEY] = []
    return data


# ------------------------------------------------------------------ migration guard
def refuse_under_migration(sub: "Subsystem", nsid: int, cntlids: Iterable[int] | None = None) -> None:
    """Refuse a change that would lose ``nsid`` or its data under a running migration."""
    from emulator.nvme.migration import cdq
    for cntlid in (sub.attached_controllers(nsid) if cntlids is None else cntlids):
        ctrl = sub.controllers.get(cntlid)
        if ctrl is None or nsid not in ctrl.nsids:
            continue
        if ctrl.state.suspended:
            raise specific(CommandSpecific.CONTROLLER_SUSPENDED,
                           f"namespace {nsid}: controller {cntlid} is suspended")
        found = cdq.udmq_of(ctrl)
        if found is not None and found[1].logging:
            raise generic(Generic.COMMAND_SEQUENCE_ERROR,
                          f"namespace {nsid}: controller {cntlid} user data changes are being logged")


# ------------------------------------------------------------------ Namespace Management
def _allocated(sub: "Subsystem", nsid: int) -> Namespace:
    ns = sub.namespaces.get(nsid)
    if ns is None or nsid == 0:
        raise generic(Generic.INVALID_NAMESPACE, f"NSID {nsid:#x} not allocated")
    return ns


def namespace_management(ctrl: "Controller", cmd: Command) -> Result:
    sel = cmd.cdw10 & 0xF
    if sel == SEL_CREATE:
        return create_namespace(ctrl, cmd), 0
    if sel == SEL_DELETE:
        sub = ctrl.subsystem
        nsids = sorted(sub.namespaces) if cmd.nsid == BROADCAST_NSID else [cmd.nsid]
        for nsid in nsids:
            _allocated(sub, nsid)
            refuse_under_migration(sub, nsid)
        for nsid in nsids:
            delete_namespace(sub, nsid)
        return 0, 0
    raise invalid_field(f"Namespace Management SEL {sel:#x}")


def create_namespace(ctrl: "Controller", cmd: Command) -> int:
    csi = (cmd.cdw11 >> 24) & 0xFF
    if csi != 0:
        raise invalid_field(f"CSI {csi:#x}: only the NVM Command Set")
    data = ctrl.data_from_host(cmd, 4096)
    nsze, ncap = CREATE_NSZE_NCAP.unpack_from(data)
    flbas = data[OFF_FLBAS]
    fmt = (flbas & 0xF) | (((flbas >> 5) & 0x3) << 4)  # FLBAS bits 3:0 and 6:5
    if fmt >= len(LBA_FORMATS) or flbas & 0x10:
        raise specific(CommandSpecific.INVALID_FORMAT, f"FLBAS {flbas:#x}")
    if nsze == 0 or ncap != nsze:
        raise invalid_field(f"NSZE {nsze} NCAP {ncap}: NCAP must equal NSZE and be nonzero")
    if data[OFF_DPS]:
        raise invalid_field("DPS: no protection information")
    for off, fmt_, name in CREATE_ZERO_FIELDS:
        if struct.unpack_from("<" + fmt_, data, off)[0]:
            raise invalid_field(f"{name} not supported")
    sub = ctrl.subsystem
    lba_size = LBA_FORMATS[fmt]
    size = nsze * lba_size
    if size > sub.unallocated_capacity():
        raise specific(CommandSpecific.NS_INSUFFICIENT_CAPACITY,
                       f"{size} bytes > UNVMCAP {sub.unallocated_capacity()}")
    free = [n for n in range(1, sub.max_nsid() + 1) if n not in sub.namespaces]
    if not free:
        raise specific(CommandSpecific.NS_IDENTIFIER_UNAVAILABLE, f"all {sub.max_nsid()} NSIDs in use")
    if sub.state_dir is None:
        raise specific(CommandSpecific.NS_INSUFFICIENT_CAPACITY, "no state directory")
    nsid = free[0]
    path = sub.state_dir / f"ns{nsid}.img"
    Namespace.remove_stale(path)
    config = NamespaceConfig(nsid, path, size, lba_size, tlbaag=default_tlbaag(lba_size),
                             shared=bool(data[OFF_NMIC] & 0x1))
    try:
        sub.namespaces[nsid] = Namespace(config, sub.nqn)
        fastgen.bump()
    except (OSError, ValueError) as e:  # larger than the file system allows (EFBIG), no space, ...
        Namespace.remove_stale(path)
        raise specific(CommandSpecific.NS_INSUFFICIENT_CAPACITY, f"{path}: {e}") from e
    log.info("namespace %d created: %d x %d bytes, %s", nsid, nsze, lba_size, path)
    sub.changed()
    return nsid


def delete_namespace(sub: "Subsystem", nsid: int) -> None:
    holders = sub.attached_controllers(nsid)
    for cntlid in holders:
        sub.attached(cntlid).discard(nsid)
    ns = sub.namespaces.pop(nsid)
    fastgen.bump()  # the fast path's namespace tables
    ns.destroy()
    log.info("namespace %d deleted", nsid)
    notify_changed(sub, holders, nsid)
    sub.changed()  # last: a full file system makes it Capacity Exceeded (subsystem.py)


# ------------------------------------------------------------------ Namespace Attachment
def namespace_attachment(ctrl: "Controller", cmd: Command) -> Result:
    sel = cmd.cdw10 & 0xF
    if sel not in (SEL_ATTACH, SEL_DETACH):
        raise invalid_field(f"Namespace Attachment SEL {sel:#x}")
    sub = ctrl.subsystem
    if cmd.nsid == BROADCAST_NSID:
        raise generic(Generic.INVALID_NAMESPACE, "Namespace Attachment takes one NSID")
    ns = _allocated(sub, cmd.nsid)
    data = ctrl.data_from_host(cmd, 4096)
    count = struct.unpack_from("<H", data)[0]
    ids = list(struct.unpack_from(f"<{min(count, 2047)}H", data, 2))
    if not ids or count > 2047 or len(set(ids)) != len(ids) or any(i not in sub.controllers for i in ids):
        raise specific(CommandSpecific.CONTROLLER_LIST_INVALID, f"controller list {ids}")
    nsid = ns.nsid
    if sel == SEL_ATTACH:
        for cntlid in ids:
            if nsid in sub.attached(cntlid):
                raise specific(CommandSpecific.NS_ALREADY_ATTACHED, f"{nsid} on {cntlid}")
        if not ns.config.shared and len(set(ids) | set(sub.attached_controllers(nsid))) > 1:
            raise specific(CommandSpecific.NS_IS_PRIVATE, f"namespace {nsid} is private")
        for cntlid in ids:
            sub.attached(cntlid).add(nsid)
    else:
        for cntlid in ids:
            if nsid not in sub.attached(cntlid):
                raise specific(CommandSpecific.NS_NOT_ATTACHED, f"{nsid} not on {cntlid}")
        refuse_under_migration(sub, nsid, ids)
        ns.flush()
        for cntlid in ids:
            sub.attached(cntlid).discard(nsid)
    fastgen.bump()  # the fast path's namespace tables
    log.info("namespace %d %s controllers %s", nsid, "attached to" if sel == SEL_ATTACH
             else "detached from", ids)
    notify_changed(sub, ids, nsid)
    sub.changed()
    return 0, 0
