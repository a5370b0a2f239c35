"""The PCI identity of an nvme-emu function.

Choice of IDs (vfio-user-protocol.md §5.3): Linux's ``nvme`` driver binds on
class 010802 whatever the IDs are, but applies quirks by ID, so:

* not 1b36 (Red Hat/QEMU: 1b36:0010 gets NVME_QUIRK_BOGUS_NID) nor 8086:5845
  (older QEMU: IDENTIFY_CNS, DISABLE_WRITE_ZEROES, BOGUS_NID);
* not 4e58 (Nutanix, used by SPDK) - that is someone else's device;
* not 1de5, which looked free but is Eideticom's (pci.ids) and out-of-tree
  drivers match 1de5:xxxx devices.

``0x4E56`` ("NV" in ASCII) is absent from pci.ids (2023.04.11) and from Linux's
``nvme_id_table`` / ``nvme_core_quirks``, so the guest applies no quirk.  It is
*not* a PCI-SIG assignment; deployments that need one override the IDs
(constructor arguments, or QEMU's ``x-pci-vendor-id`` & co.).  The NVMe
controller should report the same values in Identify Controller VID/SSVID.
"""
from __future__ import annotations

from dataclasses import dataclass

from emulator.pci.regs import PCI_CLASS_STORAGE_EXPRESS

NVME_EMU_VENDOR_ID = 0x4E56
NVME_EMU_DEVICE_ID = 0x0001  # an NVMe I/O controller function
NVME_EMU_SUBSYSTEM_VENDOR_ID = NVME_EMU_VENDOR_ID
NVME_EMU_SUBSYSTEM_ID = 0x0001
NVME_EMU_REVISION_ID = 0x01


@dataclass(frozen=True)
class PciIdentity:
    vendor_id: int = NVME_EMU_VENDOR_ID
    device_id: int = NVME_EMU_DEVICE_ID
    subsystem_vendor_id: int = NVME_EMU_SUBSYSTEM_VENDOR_ID
    subsystem_id: int = NVME_EMU_SUBSYSTEM_ID
    revision_id: int = NVME_EMU_REVISION_ID
    class_code: int = PCI_CLASS_STORAGE_EXPRESS

    def __post_init__(self) -> None:
        for name in ("vendor_id", "device_id", "subsystem_vendor_id", "subsystem_id"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFF:
                raise ValueError(f"{name} 0x{value:x} does not fit 16 bits")
        # 0xFFFF reads as "no device" (PCI 3.0 §6.2.1).
        if self.vendor_id == 0xFFFF:
            raise ValueError("vendor_id 0xffff is the invalid vendor ID")
        if not 0 <= self.revision_id <= 0xFF:
            raise ValueError("revision_id does not fit 8 bits")
        if not 0 <= self.class_code <= 0xFFFFFF:
            raise ValueError("class_code does not fit 24 bits")
