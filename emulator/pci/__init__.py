"""The PCIe function that carries an NVMe controller over vfio-user.

``NvmePciFunction`` is the vfio-user ``DeviceBackend`` (config space, BAR0,
interrupts, resets) and the controller's ``InterruptSink``.
"""
from emulator.pci.function import NvmePciFunction, split_access
from emulator.pci.ids import (NVME_EMU_DEVICE_ID, NVME_EMU_SUBSYSTEM_ID, NVME_EMU_SUBSYSTEM_VENDOR_ID,
                              NVME_EMU_VENDOR_ID, PciIdentity)
from emulator.pci.msix import Bar0Layout
from emulator.pci.state import PciFunctionState

__all__ = [
    "NvmePciFunction", "split_access", "PciIdentity", "Bar0Layout", "PciFunctionState",
    "NVME_EMU_VENDOR_ID", "NVME_EMU_DEVICE_ID", "NVME_EMU_SUBSYSTEM_VENDOR_ID", "NVME_EMU_SUBSYSTEM_ID",
]
