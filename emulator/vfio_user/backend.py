"""The device-backend interface the vfio-user server drives.

Modelled on the rust-vmm vfio-user crate's ServerBackend split: the server
owns the socket, the codec, the DMA map and the interrupt eventfds; a device
backend owns regions and device state.  Nothing here knows about PCI or NVMe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from emulator.memory import MappedMemory

# linux/vfio.h values used on the wire (vfio-user-protocol.md §8), declared in
# protocol.py and re-exported here for device backends.
from emulator.vfio_user.protocol import (  # noqa: F401  (re-exports)
    DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE, PCI_BAR0_REGION_INDEX, PCI_CONFIG_REGION_INDEX, PCI_ERR_IRQ_INDEX,
    PCI_INTX_IRQ_INDEX, PCI_MSI_IRQ_INDEX, PCI_MSIX_IRQ_INDEX, PCI_NUM_IRQS, PCI_NUM_REGIONS,
    PCI_REQ_IRQ_INDEX, PCI_ROM_REGION_INDEX, REGION_FLAG_CAPS, REGION_FLAG_MMAP, REGION_FLAG_READ,
    REGION_FLAG_WRITE)


@dataclass
class DeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int


@dataclass
class RegionInfo:
    flags: int
    size: int
    offset: int = 0
    fd: int | None = None  # sent with the reply when flags has MMAP
    sparse_areas: list[tuple[int, int]] = field(default_factory=list)  # (offset, size)


@dataclass
class IrqInfo:
    flags: int
    count: int


class IrqLines(Protocol):
    """Interrupt eventfds the client assigned with DEVICE_SET_IRQS."""

    def trigger(self, index: int, subindex: int) -> bool:
        """Signal one interrupt; False if no eventfd is assigned."""
        ...

    def assigned(self, index: int, subindex: int) -> bool:
        ...

    def masked(self, index: int, subindex: int) -> bool:
        """True while the client keeps the line masked (INTx MASK/UNMASK)."""
        ...


class DeviceBackend(Protocol):
    """What a device model implements to be served over vfio-user."""

    def device_info(self) -> DeviceInfo: ...

    def region_info(self, index: int) -> RegionInfo:
        """Raise ValueError (-> EINVAL) for an index that does not exist."""
        ...

    def irq_info(self, index: int) -> IrqInfo: ...

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Must return exactly ``count`` bytes.  ValueError -> EINVAL reply."""
        ...

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """ValueError -> EINVAL reply (never sent for NO_REPLY writes)."""
        ...

    def reset(self) -> None:
        """DEVICE_RESET: device-level reset; DMA maps and IRQ fds stay."""
        ...

    def attach(self, memory: MappedMemory, irqs: IrqLines) -> None:
        """A client connected: this is its DMA map and its interrupt lines."""
        ...

    def detach(self) -> None:
        """The client went away.  DMA maps are already gone; keep device state."""
        ...

    def irqs_changed(self, index: int) -> None:
        """SET_IRQS changed the eventfds or masks of ``index``."""
        ...

    # Optional: ``dma_mapped()`` -- a DMA_MAP added memory (work that waited for it can go on).

