"""The interface between a device model and the memory it reaches by DMA."""
from __future__ import annotations

from typing import Callable, Protocol


UNMAPPED = "in memory the client unmapped"  # and has not mapped again (yet): a remap in progress


class DmaError(Exception):
    """A DMA access touched memory the device cannot reach."""

    def __init__(self, addr: int, length: int, reason: str) -> None:
        super().__init__(f"DMA {reason} at 0x{addr:x}+0x{length:x}")
        self.addr = addr
        self.length = length
        self.reason = reason

    @property
    def unmapped(self) -> bool:
        """The client unmapped that memory and has not mapped it again: a remap in progress
        (QEMU unmaps, then maps the new pieces) may bring it back with its next DMA_MAP."""
        return self.reason == UNMAPPED


# Called with (addr, length) after every device write into guest memory.
WriteObserver = Callable[[int, int], None]


class GuestMemory(Protocol):
    """What a device model may do with guest (host) memory."""

    def views(self, addr: int, length: int, write: bool = False) -> list[memoryview]:
        """Zero-copy views covering [addr, addr+length), one per region crossed.

        ``write=True`` means the caller will store into the views; the
        memory then reports the range to its write observers.
        """
        ...

    def read(self, addr: int, length: int) -> bytes:
        ...


    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        ...

    def store_now(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """A store the host must see at once, before the device's next read of guest memory
        (doorbell-buffer EventIdx); never code.  Plain memory: the same as :meth:`write`."""
        ...
