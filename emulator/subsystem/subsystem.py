"""An NVM subsystem: namespaces shared by several controllers (Base 2.1 §1.5.x).

Besides the namespaces and controllers it holds what Namespace Management
and Namespace Attachment change: which controller has which namespace
attached, the NVM capacity (TNVMCAP) they are carved from, and the number of
namespaces it supports (NN, MNAN).  ``on_change`` is called after each such
change (the runtime persists the namespace registry there).
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from emulator.nvme.config import SubsystemInfo, default
from emulator.nvme.spec import Generic, generic

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.namespace import Namespace

log = logging.getLogger("nvme-emu.subsystem")
DEFAULT_VENDOR_ID = 0x4E56  # emulator/pci/ids.py explains the choice


@dataclass
class Subsystem:
    nqn: str = default(SubsystemInfo, "nqn")
    serial: str = default(SubsystemInfo, "serial")
    model: str = default(SubsystemInfo, "model")
    firmware: str = default(SubsystemInfo, "firmware")
    vendor_id: int = DEFAULT_VENDOR_ID
    namespaces: dict[int, "Namespace"] = field(default_factory=dict)
    controllers: dict[int, "Controller"] = field(default_factory=dict)
    # cntlid -> attached NSIDs (Namespace Attachment changes it)
    attachments: dict[int, set[int]] = field(default_factory=dict)
    capacity: int = default(SubsystemInfo, "capacity")  # TNVMCAP bytes; 0: the namespaces' sizes
    max_namespaces: int = default(SubsystemInfo, "max_namespaces")  # NN, MNAN; 0: the largest NSID
    state_dir: Optional[Path] = None  # where created namespaces' files go
    on_change: Optional[Callable[["Subsystem"], None]] = None
    unsaved: bool = False  # the last change could not be persisted (full file system)

    def max_nsid(self) -> int:
        """NN in Identify Controller: the largest NSID the subsystem may use."""
        return max(self.max_namespaces, max(self.namespaces, default=1))

    def allocated_bytes(self) -> int:
        return sum(ns.config.size for ns in self.namespaces.values())

    def total_capacity(self) -> int:
        """TNVMCAP (Base 2.1 Figure 312): namespaces are carved from it."""
        return max(self.capacity, self.allocated_bytes())

    def unallocated_capacity(self) -> int:
        """UNVMCAP: what Namespace Management may still allocate."""
        return self.total_capacity() - self.allocated_bytes()

    def attached(self, cntlid: int) -> set[int]:
        return self.attachments.setdefault(cntlid, set())

    def attached_controllers(self, nsid: int) -> list[int]:
        return sorted(c for c, nsids in self.attachments.items()
                      if nsid in nsids and c in self.controllers)

    def shared(self, nsid: int) -> bool:
        """NMIC bit 0: the namespace may be attached to two or more controllers."""
        ns = self.namespaces.get(nsid)
        return bool(ns is not None and ns.config.shared)

    def changed(self) -> None:
        """Persist a change (``on_change``).  A full file system that refuses it fails the
        command with Capacity Exceeded; the change stays made in memory and the next change,
        or closing the subsystem, persists it."""
        if self.on_change is None:
            return
        try:
            self.on_change(self)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.unsaved = True
            raise generic(Generic.CAPACITY_EXCEEDED, f"namespace registry not stored: {e}") from None
        self.unsaved = False

    def close(self) -> None:
        if self.unsaved and self.on_change is not None:
            try:
                self.on_change(self)
            except OSError as e:
                log.error("namespace registry not stored: %s", e)
        for ns in self.namespaces.values():
            ns.close()
