"""The device-backend interface the vfio-user server drives.

Modelled on the rust-vmm vfio-user crate's ServerBackend split: the server
owns the socket, the codec, the DMA map and the interrupt eventfds; a device
backend owns regions and device state.  Nothing here knows about PCI or NVMe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from emulator.memory import MappedMemory


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

    def direct_fd(self, index: int, subindex: int) -> int | None:
        """The eventfd a write of 1 to signals this line exactly as ``trigger`` would,
        with nothing else to do (assigned, not masked, not automasked, nothing held back),
        until the next message of the client; None otherwise."""
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

