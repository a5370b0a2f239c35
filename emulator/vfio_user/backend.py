"""The device-backend interface the vfio-user server drives.

Modelled on the rust-vmm vfio-user crate's ServerBackend split: the server
owns the socket, the codec, the DMA map and the interrupt eventfds; a device
backend owns regions and device state.  Nothing here knows about PCI or NVMe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from emulator.memory import MappedMemory

# linux/vfio.h values used on the wire (vfio-user-protocol.md §8)
DEVICE_FLAGS_RESET = 0x1
DEVICE_FLAGS_PCI = 0x2

REGION_FLAG_READ = 0x1
REGION_FLAG_WRITE = 0x2
REGION_FLAG_MMAP = 0x4
REGION_FLAG_CAPS = 0x8

IRQ_INFO_EVENTFD = 0x1
IRQ_INFO_MASKABLE = 0x2
IRQ_INFO_AUTOMASKED = 0x4
IRQ_INFO_NORESIZE = 0x8

PCI_BAR0_REGION_INDEX = 0
PCI_ROM_REGION_INDEX = 6
PCI_CONFIG_REGION_INDEX = 7
PCI_NUM_REGIONS = 9

PCI_INTX_IRQ_INDEX = 0
PCI_MSI_IRQ_INDEX = 1
PCI_MSIX_IRQ_INDEX = 2
PCI_ERR_IRQ_INDEX = 3
PCI_REQ_IRQ_INDEX = 4
PCI_NUM_IRQS = 5


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


# A timer/event scheduler the server's loop offers to device models.
Callback = Callable[[], None]
