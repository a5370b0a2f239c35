"""What the NVMe controller sees of the world: memory, interrupts, time.

The controller knows nothing of vfio-user or PCI.  A PCI function (or a test)
gives it a GuestMemory for DMA, an InterruptSink for its interrupt vectors and
a Scheduler for deferred work; it exposes MMIO (BAR0) reads and writes.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from emulator.memory import GuestMemory

__all__ = ["GuestMemory", "InterruptSink", "Scheduler", "TimerHandle", "MmioDevice"]


class InterruptSink(Protocol):
    """Interrupt vectors of the function the controller sits in."""

    def fire(self, vector: int) -> None:
        """Raise interrupt ``vector`` (MSI-X vector, or the pin when MSI-X is off)."""
        ...

    def msix_enabled(self) -> bool:
        """True when MSI-X is in use (INTMS/INTMC then do not apply, NVMe Base 3.1.4)."""
        ...


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """The subset of asyncio's event loop the controller uses."""

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle: ...

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> Any: ...


class MmioDevice(Protocol):
    """What a PCI function needs from the device behind BAR0."""

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
