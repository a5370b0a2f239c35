"""A configuration space image with per-bit write masks.

Every byte has a write mask: a write stores ``(old & ~wmask) | (new & wmask)``,
so read-only bits (BAR type bits, IDs, capability pointers) keep their value
and writes anywhere are accepted without error (vfio-user-protocol.md §5.1:
QEMU forwards every guest config write).  A second mask marks the bits that a
Function Level Reset leaves alone (PCIe 4.0 §6.6.2).
"""
from __future__ import annotations

from emulator.pci.regs import BY_WIDTH, CONFIG_SPACE_SIZE


class ConfigSpace:
    def __init__(self, size: int = CONFIG_SPACE_SIZE) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.flr_keep = bytearray(size)  # bits preserved by FLR

    # -- raw access (ignores masks: for building and for device state) -----
    def get(self, offset: int, width: int) -> int:
        return int(BY_WIDTH[width].unpack_from(self.data, offset)[0])

    def set(self, offset: int, width: int, value: int) -> None:
        BY_WIDTH[width].pack_into(self.data, offset, value)

    def set_bits(self, offset: int, width: int, bits: int, on: bool) -> None:
        value = self.get(offset, width)
        self.set(offset, width, value | bits if on else value & ~bits)

    def set_wmask(self, offset: int, width: int, mask: int) -> None:
        BY_WIDTH[width].pack_into(self.wmask, offset, mask)

    def set_flr_keep(self, offset: int, width: int, mask: int) -> None:
        BY_WIDTH[width].pack_into(self.flr_keep, offset, mask)

    # -- guest access -------------------------------------------------------
    def check_range(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise ValueError(f"config access 0x{offset:x}+{count} outside 0x{self.size:x} bytes")

    def read(self, offset: int, count: int) -> bytes:
        self.check_range(offset, count)
        return bytes(self.data[offset:offset + count])

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` through the write masks."""
        self.check_range(offset, len(data))
        for i, byte in enumerate(data):
            pos = offset + i
            mask = self.wmask[pos]
            if mask:
                self.data[pos] = (self.data[pos] & ~mask & 0xFF) | (byte & mask)

    # -- reset / state --------------------------------------------------------
    def copy(self) -> "ConfigSpace":
        other = ConfigSpace(self.size)
        other.data[:] = self.data
        other.wmask[:] = self.wmask
        other.flr_keep[:] = self.flr_keep
        return other

    def reset_to(self, defaults: "ConfigSpace", keep_flr_bits: bool = False) -> None:
        """Restore power-on values; with ``keep_flr_bits`` the FLR-exempt bits stay."""
        if not keep_flr_bits:
            self.data[:] = defaults.data
            return
        for pos in range(self.size):
            keep = self.flr_keep[pos]
            self.data[pos] = (defaults.data[pos] & ~keep & 0xFF) | (self.data[pos] & keep)
