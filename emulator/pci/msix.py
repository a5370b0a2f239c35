"""BAR0 layout and the MSI-X table / Pending Bit Array storage.

QEMU emulates the MSI-X table itself (vfio-user-protocol.md §5.2: guest table
writes never reach the server) and forwards only PBA reads; a Python test
client does neither, so the table is kept as plain storage that reads back
what was written.  Per-vector Mask bits are stored but not acted on: under
QEMU they would never be cleared here, and QEMU masks a vector by swapping its
eventfd (SET_IRQS) instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from emulator.pci.regs import (MSIX_ENTRY, MSIX_ENTRY_CTRL_MASKBIT, MSIX_ENTRY_SIZE,
                               MSIX_ENTRY_VECTOR_CTRL, MSIX_MAX_VECTORS)

PAGE = 0x1000
NVME_WINDOW_SIZE = 0x2000  # NVMe registers 0x0-0xFFF, doorbells 0x1000-0x1FFF
BAR0_MIN_SIZE = 0x4000  # NVMe MLBAR bits 31:14: BAR0 is at least 16 KiB


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _pow2_at_least(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


@dataclass(frozen=True)
class Bar0Layout:
    """Where things sit in BAR0.

    Up to 256 vectors: NVMe window 0x0000-0x1FFF, table 0x2000, PBA 0x3000,
    BAR0 16 KiB.  Larger tables push the PBA up and grow BAR0 to the next
    power of two, keeping each area on its own 4 KiB pages.
    """

    vectors: int

    def __post_init__(self) -> None:
        if not 1 <= self.vectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X vectors must be 1..{MSIX_MAX_VECTORS}, not {self.vectors}")

    @property
    def nvme_size(self) -> int:
        return NVME_WINDOW_SIZE

    @property
    def table_offset(self) -> int:
        return NVME_WINDOW_SIZE

    @property
    def table_size(self) -> int:
        return _align_up(self.vectors * MSIX_ENTRY_SIZE, PAGE)

    @property
    def pba_offset(self) -> int:
        return self.table_offset + self.table_size

    @property
    def pba_size(self) -> int:
        return PAGE  # 2048 bits = 256 bytes always fit

    @property
    def bar_size(self) -> int:
        return max(BAR0_MIN_SIZE, _pow2_at_least(self.pba_offset + self.pba_size))


class MsixTable:
    """MSI-X table entries and pending bits of one function."""

    def __init__(self, vectors: int) -> None:
        self.vectors = vectors
        self.table = bytearray(vectors * MSIX_ENTRY_SIZE)
        # PBA: one bit per vector in little-endian QWORDs (PCI 3.0 §6.8.2.10).
        self.pba = bytearray(8 * ((vectors + 63) // 64))
        self.reset()

    def reset(self) -> None:
        """Power-on values: every entry zero with its Mask bit set (PCI 3.0 §6.8.2.9)."""
        for v in range(self.vectors):
            MSIX_ENTRY.pack_into(self.table, v * MSIX_ENTRY_SIZE, 0, 0, 0, MSIX_ENTRY_CTRL_MASKBIT)
        self.pba[:] = bytes(len(self.pba))

    # -- table ---------------------------------------------------------------
    def read_table(self, offset: int, count: int) -> bytes:
        """Bytes of the table window; past the last entry reads 0."""
        out = bytes(self.table[offset:offset + count])
        return out + bytes(count - len(out))

    def write_table(self, offset: int, data: bytes) -> None:
        """Store into the table window; past the last entry writes are dropped."""
        end = min(offset + len(data), len(self.table))
        if offset < end:
            self.table[offset:end] = data[:end - offset]

    def entry(self, vector: int) -> tuple[int, int, int, int]:
        """(address low, address high, data, vector control) of ``vector``."""
        return MSIX_ENTRY.unpack_from(self.table, vector * MSIX_ENTRY_SIZE)

    def vector_masked(self, vector: int) -> bool:
        ctrl_at = vector * MSIX_ENTRY_SIZE + MSIX_ENTRY_VECTOR_CTRL
        return bool(self.table[ctrl_at] & MSIX_ENTRY_CTRL_MASKBIT)

    # -- pending bits --------------------------------------------------------
    def read_pba(self, offset: int, count: int) -> bytes:
        out = bytes(self.pba[offset:offset + count])
        return out + bytes(count - len(out))

    def set_pending(self, vector: int, pending: bool = True) -> None:
        byte, bit = divmod(vector, 8)
        if pending:
            self.pba[byte] |= 1 << bit
        else:
            self.pba[byte] &= ~(1 << bit) & 0xFF

    def is_pending(self, vector: int) -> bool:
        byte, bit = divmod(vector, 8)
        return bool(self.pba[byte] >> bit & 1)

    def pending_vectors(self) -> list[int]:
        return [v for v in range(self.vectors) if self.is_pending(v)]
