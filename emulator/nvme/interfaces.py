"""What the NVMe controller sees of the world: memory, interrupts, time.

The controller knows nothing of vfio-user or PCI.  A PCI function (or a test)
gives it a GuestMemory for DMA, an InterruptSink for its interrupt vectors and
a Scheduler for deferred work; it exposes MMIO (BAR0) reads and writes
(emulator/pci/device.py says what the PCI side needs of it).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from emulator.memory import GuestMemory

__all__ = ["GuestMemory", "InterruptSink", "Scheduler", "TimerHandle"]


class InterruptSink(Protocol):
    """Interrupt vectors of the function the controller sits in."""

    def fire(self, vector: int) -> None:
        """Raise interrupt ``vector`` (MSI-X vector, or the pin when MSI-X is off)."""
        ...

    def msix_enabled(self) -> bool:
        """True when MSI-X is in use (INTMS/INTMC then do not apply, NVMe Base 3.1.4)."""
        ...

    # Optional: ``direct_fd(vector) -> int | None``, an eventfd a write of 1 to raises
    # ``vector`` exactly as ``fire`` would, with nothing else to do, until the next
    # message of the VMM (emulator/nvme/sqwait.py fires from C with it).


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """The subset of asyncio's event loop the controller uses."""

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle: ...

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> Any: ...

