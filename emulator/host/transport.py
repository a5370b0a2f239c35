"""How the host driver reaches a controller: MMIO, DMA memory, interrupts.

- VfioUserTransport: the real thing, over a vfio-user socket (tests, the
  migration tool).  Host memory is a memfd registered with DMA_MAP; MSI-X
  vectors are eventfds registered with SET_IRQS.
- DirectTransport: a Controller object in this process (unit tests of the
  controller without sockets).
"""
from __future__ import annotations

import os
import select
import struct
from typing import TYPE_CHECKING, Protocol

from emulator.host.memory import HostMemory
from emulator.memory import MappedMemory

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.vfio_user.client import VfioUserClient

# PCI config space offsets (PCI Local Bus 3.0 §6.1, §6.8.2)
PCI_COMMAND = 0x04
PCI_CAP_PTR = 0x34
PCI_CAP_ID_MSIX = 0x11
PCI_COMMAND_MEMORY, PCI_COMMAND_MASTER = 0x2, 0x4
MSIX_ENABLE = 1 << 15

VFIO_IRQ_SET_DATA_EVENTFD = 0x4
VFIO_IRQ_SET_ACTION_TRIGGER = 0x20
VFIO_PCI_MSIX_IRQ_INDEX = 2
BAR0, CONFIG = 0, 7


class Transport(Protocol):
    memory: HostMemory

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int, posted: bool = True) -> None: ...

    def wait_irq(self, vector: int, timeout: float) -> bool:
        """Wait for an interrupt on ``vector``; True if one arrived."""
        ...

    def close(self) -> None: ...


class DirectTransport:
    """Drives an in-process Controller; completions are found by polling."""

    def __init__(self, controller: "Controller", memory: HostMemory) -> None:
        self.controller = controller
        self.memory = memory
        self.dma = MappedMemory()
        self.dma.add(memory.iova, memory.size, memory.fd, 0, writable=True)
        controller.set_memory(self.dma)
        self.fired: list[int] = []

    # InterruptSink for the controller
    def fire(self, vector: int) -> None:
        self.fired.append(vector)

    def msix_enabled(self) -> bool:
        return True

    def mmio_read(self, offset: int, size: int) -> int:
        return self.controller.mmio_read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int, posted: bool = True) -> None:
        self.controller.mmio_write(offset, size, value)

    def wait_irq(self, vector: int, timeout: float) -> bool:
        if vector in self.fired:
            self.fired.remove(vector)
            return True
        return False

    def close(self) -> None:
        self.controller.set_memory(None)
        self.dma.clear()


class VfioUserTransport:
    """A vfio-user client set up the way QEMU sets up a vfio-user-pci device."""

    def __init__(self, client: "VfioUserClient", memory: HostMemory, vectors: int = 8,
                 posted_writes: bool = True, resumed: bool = False) -> None:
        """``resumed``: the client is negotiated and the memory mapped, and the device's
        PCI function came with a migration stream: only the interrupt eventfds are set up
        (as a VMM does on the destination before the device runs again)."""
        self.client = client
        self.memory = memory
        self.posted_writes = posted_writes
        if resumed:
            self._irqs(vectors)
            return
        client.negotiate()
        client.dma_map(memory.iova, memory.size, fd=memory.fd, offset=0, flags=3)
        client.device_info()
        for index in range(9):  # like QEMU at realize; we keep no region fds
            try:
                info = client.region_info(index)
            except Exception:
                continue
            if getattr(info, "fd", None) is not None:
                os.close(info.fd)
        cmd = self.config_read(PCI_COMMAND, 2)
        self.config_write(PCI_COMMAND, 2, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
        if self._irqs(vectors):
            ctl = self.config_read(self.msix_cap + 2, 2)
            self.config_write(self.msix_cap + 2, 2, ctl | MSIX_ENABLE)

    def _irqs(self, vectors: int) -> bool:
        """One eventfd per MSI-X vector (up to ``vectors``), given with SET_IRQS."""
        self.msix_cap = self._find_cap(PCI_CAP_ID_MSIX)
        self.eventfds: list[int] = []
        if not self.msix_cap:
            return False
        table_size = (self.config_read(self.msix_cap + 2, 2) & 0x7FF) + 1
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                         for _ in range(min(vectors, table_size))]
        self.client.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                             0, len(self.eventfds), self.eventfds)
        return True

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.client.region_read(CONFIG, offset, size), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.client.region_write(CONFIG, offset, value.to_bytes(size, "little"))

    def _find_cap(self, cap_id: int) -> int:
        ptr = self.config_read(PCI_CAP_PTR, 1)
        seen = 0
        while ptr and seen < 48:
            cid, nxt = struct.unpack("<BB", self.client.region_read(CONFIG, ptr, 2))
            if cid == cap_id:
                return ptr
            ptr, seen = nxt, seen + 1
        return 0

    def mmio_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.client.region_read(BAR0, offset, size), "little")

    def mmio_write(self, offset: int, size: int, value: int, posted: bool = True) -> None:
        self.client.region_write(BAR0, offset, value.to_bytes(size, "little"),
                                 posted=posted and self.posted_writes)

    def serve_requests(self) -> int:
        """Answer the server's DMA_READ/DMA_WRITE requests that have arrived (a polling host
        must, or a server sending its writes as messages waits for it)."""
        if self.client.memory is None:
            return 0
        return self.client.process_requests(0.0)

    def wait_irq(self, vector: int, timeout: float) -> bool:
        if vector >= len(self.eventfds):
            return False
        fd = self.eventfds[vector]
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return False
        try:
            os.read(fd, 8)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []
        self.client.close()
