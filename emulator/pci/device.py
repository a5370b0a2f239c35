"""What a PCI function needs from the device behind its BAR0."""
from __future__ import annotations

from typing import Protocol

from emulator.memory import GuestMemory


class MmioDevice(Protocol):
    """The device model a PCI function forwards BAR0 accesses and resets to
    (the NVMe controller implements it)."""

    def mmio_read(self, offset: int, size: int) -> int:
        """Read 1/2/4/8 bytes of BAR0 at ``offset`` (little-endian value)."""
        ...

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Write 1/2/4/8 bytes of BAR0 at ``offset``."""
        ...

    def function_reset(self) -> None:
        """PCI-level reset (DEVICE_RESET, FLR): a Controller Level Reset."""
        ...

    def set_memory(self, memory: GuestMemory | None) -> None:
        """DMA becomes possible (bus master on, client attached) or impossible."""
        ...

    # Optional: ``mmio_writer(offset, size) -> Callable[[int], None] | None`` -- a handler
    # prepared once for ``size``-byte writes at ``offset`` (a doorbell), taking the value; it
    # must do what ``mmio_write(offset, size, value)`` does and stay valid for the device's
    # life.  The function asks once per offset and calls it instead of mmio_write.
