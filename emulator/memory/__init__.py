"""Guest memory as a device sees it: an interval map of DMA regions.

The vfio-user server fills a :class:`MappedMemory` from DMA_MAP/DMA_UNMAP; the
NVMe controller only ever sees the :class:`GuestMemory` protocol.  Accesses
outside mapped memory (or into regions that came without an fd, or writes into
read-only regions) raise :class:`DmaError`; the controller turns that into a
Data Transfer Error status.
"""
from emulator.memory.guest_memory import DmaError, GuestMemory, WriteObserver
from emulator.memory.mapped import MappedMemory, Region

__all__ = ["DmaError", "GuestMemory", "WriteObserver", "MappedMemory", "Region"]
