"""Host memory for the userspace driver: one memfd, registered with DMA_MAP.

A trivial page allocator hands out DMA buffers; every buffer has an IOVA
(what goes into PRPs) and a memoryview (what the driver reads and writes).
"""
from __future__ import annotations

import mmap
import os

PAGE = 4096
DEFAULT_IOVA = 0x1_0000_0000


class HostMemory:
    def __init__(self, size: int = 64 << 20, iova: int = DEFAULT_IOVA, name: str = "nvme-host",
                 sealed: bool = False) -> None:
        """``sealed``: seal the memfd against shrinking and growing, as QEMU's
        memory-backend-memfd does, so the emulator may copy to it directly."""
        self.size = size
        self.iova = iova
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealed else 0)
        self.fd = os.memfd_create(name, flags)
        os.ftruncate(self.fd, size)
        if sealed:
            import fcntl
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self._mmap = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        self.view = memoryview(self._mmap)
        self._next = 0
        self._free: dict[int, list[int]] = {}  # size -> offsets

    def alloc(self, size: int, align: int = PAGE) -> int:
        """Return the IOVA of a zeroed buffer of ``size`` bytes."""
        size = max(PAGE, (size + PAGE - 1) // PAGE * PAGE)
        free = self._free.get(size)
        if free:
            off = free.pop()
        else:
            off = (self._next + align - 1) // align * align
            if off + size > self.size:
                raise MemoryError("host memory exhausted")
            self._next = off + size
        self.view[off:off + size] = bytes(size)
        return self.iova + off

    def free(self, iova: int, size: int) -> None:
        size = max(PAGE, (size + PAGE - 1) // PAGE * PAGE)
        self._free.setdefault(size, []).append(iova - self.iova)

    def contains(self, iova: int, length: int = 1) -> bool:
        return self.iova <= iova and iova + length <= self.iova + self.size

    def buf(self, iova: int, length: int) -> memoryview:
        off = iova - self.iova
        if off < 0 or off + length > self.size:
            raise ValueError(f"IOVA {iova:#x}+{length} outside host memory")
        return self.view[off:off + length]

    def read(self, iova: int, length: int) -> bytes:
        return bytes(self.buf(iova, length))

    def write(self, iova: int, data: bytes) -> None:
        self.buf(iova, len(data))[:] = data

    def close(self) -> None:
        self.view.release()
        self._mmap.close()
        os.close(self.fd)
