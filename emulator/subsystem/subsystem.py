"""An NVM subsystem: namespaces shared by several controllers (Base 2.1 §1.5.x)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from emulator.nvme.config import SubsystemInfo, default

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.namespace import Namespace

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

    def max_nsid(self) -> int:
        """NN in Identify Controller: the largest NSID the subsystem may use."""
        return max(self.namespaces, default=1)

    def shared(self, nsid: int) -> bool:
        """True when more than one controller may attach the namespace (NMIC)."""
        return sum(1 for c in self.controllers.values() if nsid in c.config.namespaces) > 1

    def close(self) -> None:
        for ns in self.namespaces.values():
            ns.close()
