"""NvmePciFunction driven the way QEMU 11.1 and the Python test client drive it."""
from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.memory import MappedMemory
from emulator.pci import Bar0Layout, NvmePciFunction, PciFunctionState, split_access
from emulator.pci import regs as r
from emulator.pci.capabilities import MSIX_CAP_OFFSET, PCIE_CAP_OFFSET, PM_CAP_OFFSET
from emulator.vfio_user.protocol import (DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, IRQ_INFO_AUTOMASKED,
                                         IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, PCI_INTX_IRQ_INDEX,
                                         PCI_MSIX_IRQ_INDEX, REGION_FLAG_READ, REGION_FLAG_WRITE)

CFG = 7
BAR0 = 0


class FakeIrqLines:
    """Eventfds per (index, subindex), like the server's SET_IRQS bookkeeping."""

    def __init__(self) -> None:
        self.fds: dict[tuple[int, int], int] = {}
        self.mask_state: dict[tuple[int, int], bool] = {}

    def assign(self, index: int, subindex: int) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.fds[(index, subindex)] = fd
        return fd

    def trigger(self, index: int, subindex: int) -> bool:
        fd = self.fds.get((index, subindex))
        if fd is None:
            return False
        os.eventfd_write(fd, 1)
        return True

    def assigned(self, index: int, subindex: int) -> bool:
        return (index, subindex) in self.fds

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


class MaskingIrqLines(FakeIrqLines):
    """An IrqLines that also reports MASK/UNMASK state."""

    def masked(self, index: int, subindex: int) -> bool:
        return self.mask_state.get((index, subindex), False)


def signals(fd: int) -> int:
    """Counter value of an eventfd (0 if never written); resets it."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class FakeMmio:
    def __init__(self) -> None:
        self.regs: dict[int, int] = {}
        self.calls: list[tuple] = []
        self.resets = 0
        self.memory: object = "unset"

    def mmio_read(self, offset: int, size: int) -> int:
        self.calls.append(("r", offset, size))
        return self.regs.get(offset, 0x1122334455667788) & ((1 << 8 * size) - 1)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.calls.append(("w", offset, size, value))
        self.regs[offset] = value

    def function_reset(self) -> None:
        self.resets += 1

    def set_memory(self, memory: object) -> None:
        self.memory = memory


def cfg_read(fn: NvmePciFunction, offset: int, width: int) -> int:
    return int.from_bytes(fn.region_read(CFG, offset, width), "little")


def cfg_write(fn: NvmePciFunction, offset: int, width: int, value: int) -> None:
    fn.region_write(CFG, offset, value.to_bytes(width, "little"))


@pytest.fixture
def fn() -> NvmePciFunction:
    return NvmePciFunction()


@pytest.fixture
def irqs():
    lines = FakeIrqLines()
    yield lines
    lines.close()


def attach(fn: NvmePciFunction, irqs: FakeIrqLines) -> None:
    fn.attach(MappedMemory(), irqs)


# -- realize: what QEMU reads -------------------------------------------------------------
def test_realize_config_read_and_capability_chain(fn: NvmePciFunction) -> None:
    space = fn.region_read(CFG, 0, 4096)  # the one 4096-byte read at realize (§4.0)
    assert len(space) == 4096
    vendor, device, command, status = struct.unpack_from("<HHHH", space, 0)
    assert (vendor, device) == (0x4E56, 0x0001)
    assert command == 0
    assert status & r.PCI_STATUS_CAP_LIST
    assert int.from_bytes(space[9:12], "little") == 0x010802
    assert space[r.PCI_HEADER_TYPE] == 0
    assert struct.unpack_from("<HH", space, r.PCI_SUBSYSTEM_VENDOR_ID) == (0x4E56, 0x0001)
    assert space[r.PCI_INTERRUPT_PIN] == 1
    assert struct.unpack_from("<I", space, r.PCI_ROM_ADDRESS)[0] == 0
    assert struct.unpack_from("<I", space, r.PCI_BASE_ADDRESS_0)[0] == r.PCI_BASE_ADDRESS_MEM_TYPE_64
    assert struct.unpack_from("<I", space, 0x100)[0] == 0  # no extended capabilities

    chain = []
    pos = space[r.PCI_CAPABILITY_LIST]
    while pos:
        assert pos % 4 == 0 and 0x40 <= pos < 0x100
        chain.append((space[pos], pos))
        pos = space[pos + 1]
    assert [cap for cap, _ in chain] == [r.PCI_CAP_ID_PM, r.PCI_CAP_ID_EXP, r.PCI_CAP_ID_MSIX]
    # Packed back to back: QEMU sizes a capability by the next one's position.
    assert [p for _, p in chain] == [PM_CAP_OFFSET, PM_CAP_OFFSET + 8, PM_CAP_OFFSET + 8 + 0x3C]

    pmcsr = struct.unpack_from("<H", space, PM_CAP_OFFSET + r.PCI_PM_CTRL)[0]
    assert pmcsr & r.PCI_PM_CTRL_NO_SOFT_RESET and pmcsr & r.PCI_PM_CTRL_STATE_MASK == 0
    flags, devcap = struct.unpack_from("<HI", space, PCIE_CAP_OFFSET + r.PCI_EXP_FLAGS)
    assert flags & 0xF == 2 and (flags >> 4) & 0xF == 0  # version 2, Endpoint
    assert devcap & r.PCI_EXP_DEVCAP_FLR
    ctrl, table, pba = struct.unpack_from("<HII", space, MSIX_CAP_OFFSET + 2)
    assert ctrl == 63  # table size N-1, disabled, unmasked
    assert table == 0x2000 and pba == 0x3000  # BIR 0


def test_realize_msix_reads_like_qemu(fn: NvmePciFunction) -> None:
    assert cfg_read(fn, MSIX_CAP_OFFSET + 2, 2) == 63
    assert cfg_read(fn, MSIX_CAP_OFFSET + 4, 4) == 0x2000
    assert cfg_read(fn, MSIX_CAP_OFFSET + 8, 4) == 0x3000
    assert cfg_read(fn, r.PCI_INTERRUPT_PIN, 1) == 1


def test_rom_sizing_reads_back_zero(fn: NvmePciFunction) -> None:
    orig = cfg_read(fn, r.PCI_ROM_ADDRESS, 4)
    cfg_write(fn, r.PCI_ROM_ADDRESS, 4, 0xFFFFF800)
    assert cfg_read(fn, r.PCI_ROM_ADDRESS, 4) == 0
    cfg_write(fn, r.PCI_ROM_ADDRESS, 4, orig)
    assert orig == 0


def test_bar_sizing_and_type_bits(fn: NvmePciFunction) -> None:
    cfg_write(fn, r.PCI_BASE_ADDRESS_0, 4, 0xFFFFFFFF)
    assert cfg_read(fn, r.PCI_BASE_ADDRESS_0, 4) == 0xFFFFC004  # 16 KiB, 64-bit memory
    cfg_write(fn, r.PCI_BASE_ADDRESS_0 + 4, 4, 0xFFFFFFFF)
    assert cfg_read(fn, r.PCI_BASE_ADDRESS_0 + 4, 4) == 0xFFFFFFFF
    cfg_write(fn, r.PCI_BASE_ADDRESS_0, 4, 0xFEBF1237)  # address + junk low bits
    cfg_write(fn, r.PCI_BASE_ADDRESS_0 + 4, 4, 0x1)
    assert cfg_read(fn, r.PCI_BASE_ADDRESS_0, 4) == 0xFEBF0004
    assert cfg_read(fn, r.PCI_BASE_ADDRESS_0 + 4, 4) == 0x1
    for bar in range(2, 6):
        cfg_write(fn, r.PCI_BASE_ADDRESS_0 + 4 * bar, 4, 0xFFFFFFFF)
        assert cfg_read(fn, r.PCI_BASE_ADDRESS_0 + 4 * bar, 4) == 0


def test_regions_and_irqs(fn: NvmePciFunction) -> None:
    info = fn.device_info()
    assert info.flags == DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET
    assert (info.num_regions, info.num_irqs) == (9, 5)
    bar0 = fn.region_info(0)
    assert (bar0.flags, bar0.size, bar0.fd, bar0.sparse_areas) == (REGION_FLAG_READ | REGION_FLAG_WRITE,
                                                                  0x4000, None, [])
    assert [fn.region_info(i).size for i in range(1, 7)] == [0] * 6
    assert fn.region_info(7).size == 4096 and fn.region_info(7).flags == REGION_FLAG_READ | REGION_FLAG_WRITE
    assert fn.region_info(8).size == 0
    with pytest.raises(ValueError):
        fn.region_info(9)
    got = [(fn.irq_info(i).count, fn.irq_info(i).flags) for i in range(5)]
    assert got == [(1, IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED), (0, IRQ_INFO_EVENTFD),
                   (64, IRQ_INFO_EVENTFD), (1, IRQ_INFO_EVENTFD), (0, IRQ_INFO_EVENTFD)]
    with pytest.raises(ValueError):
        fn.irq_info(5)
    with pytest.raises(ValueError):
        fn.region_read(2, 0, 4)


# -- config writes -----------------------------------------------------------------------------
def test_command_read_modify_write_latches(fn: NvmePciFunction) -> None:
    # Linux pci_enable_device_mem + pci_set_master: read, OR a bit, write back.
    cfg_write(fn, r.PCI_COMMAND, 2, cfg_read(fn, r.PCI_COMMAND, 2) | r.PCI_COMMAND_MEMORY)
    cfg_write(fn, r.PCI_COMMAND, 2, cfg_read(fn, r.PCI_COMMAND, 2) | r.PCI_COMMAND_MASTER)
    assert cfg_read(fn, r.PCI_COMMAND, 2) == r.PCI_COMMAND_MEMORY | r.PCI_COMMAND_MASTER
    cfg_write(fn, r.PCI_COMMAND + 1, 1, 0x04)  # byte write of INTX_DISABLE
    assert cfg_read(fn, r.PCI_COMMAND, 2) == 0x0406
    cfg_write(fn, r.PCI_COMMAND, 2, 0xFFFF)
    assert cfg_read(fn, r.PCI_COMMAND, 2) == 0x0547  # IO MEM MASTER PARITY SERR INTX_DISABLE
    assert cfg_read(fn, r.PCI_STATUS, 2) == r.PCI_STATUS_CAP_LIST  # status unchanged


def test_writes_anywhere_accepted_read_only_kept(fn: NvmePciFunction) -> None:
    before = fn.region_read(CFG, 0, 4096)
    for off in range(0, 4096, 4):
        if off != PCIE_CAP_OFFSET + r.PCI_EXP_DEVCTL:  # FLR resets; tested separately
            fn.region_write(CFG, off, b"\xff\xff\xff\xff")
    after = fn.region_read(CFG, 0, 4096)
    for off in (r.PCI_VENDOR_ID, r.PCI_REVISION_ID, r.PCI_SUBSYSTEM_VENDOR_ID, r.PCI_CAPABILITY_LIST,
                MSIX_CAP_OFFSET + 4, MSIX_CAP_OFFSET + 8, PCIE_CAP_OFFSET + r.PCI_EXP_DEVCAP, 0x100, 0xFFC):
        assert after[off:off + 4] == before[off:off + 4], hex(off)
    assert after[r.PCI_ROM_ADDRESS:r.PCI_ROM_ADDRESS + 4] == bytes(4)
    # Unaligned multi-byte accesses inside the space work.
    assert fn.region_read(CFG, 3, 4) == after[3:7]
    fn.region_write(CFG, 0xFFF, b"\x01")
    with pytest.raises(ValueError):
        fn.region_read(CFG, 4094, 4)
    with pytest.raises(ValueError):
        fn.region_write(CFG, 4096, b"\x00")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 4095), st.binary(min_size=1, max_size=4))
def test_random_config_writes_keep_identity(offset: int, data: bytes) -> None:
    fn = NvmePciFunction()
    data = data[:4096 - offset]
    fn.region_write(CFG, offset, data)
    assert cfg_read(fn, r.PCI_VENDOR_ID, 4) == 0x00014E56
    assert cfg_read(fn, r.PCI_CLASS_PROG, 3) == 0x010802
    assert cfg_read(fn, r.PCI_CAPABILITY_LIST, 1) == PM_CAP_OFFSET
    assert cfg_read(fn, r.PCI_ROM_ADDRESS, 4) == 0
    assert cfg_read(fn, r.PCI_BASE_ADDRESS_0, 4) & 0x3FFF == r.PCI_BASE_ADDRESS_MEM_TYPE_64


def test_pm_state_d0_d3_only(fn: NvmePciFunction) -> None:
    pmcsr = PM_CAP_OFFSET + r.PCI_PM_CTRL
    cfg_write(fn, pmcsr, 2, 3)
    assert cfg_read(fn, pmcsr, 2) == r.PCI_PM_CTRL_NO_SOFT_RESET | 3
    cfg_write(fn, pmcsr, 2, 1)  # D1 unsupported: ignored
    assert cfg_read(fn, pmcsr, 2) & 3 == 3
    cfg_write(fn, pmcsr, 2, 0)
    assert cfg_read(fn, pmcsr, 2) == r.PCI_PM_CTRL_NO_SOFT_RESET


# -- MSI-X ----------------------------------------------------------------------------------
def enable_msix(fn: NvmePciFunction, mask_all: bool = False) -> None:
    value = r.PCI_MSIX_FLAGS_ENABLE | (r.PCI_MSIX_FLAGS_MASKALL if mask_all else 0)
    cfg_write(fn, MSIX_CAP_OFFSET + 2, 2, value)


def pba_bits(fn: NvmePciFunction) -> int:
    return int.from_bytes(fn.region_read(BAR0, fn.layout.pba_offset, 8), "little")


def test_msix_enable_then_fire_writes_eventfd(fn: NvmePciFunction, irqs: FakeIrqLines) -> None:
    attach(fn, irqs)
    fd = irqs.assign(PCI_MSIX_IRQ_INDEX, 3)
    assert not fn.msix_enabled()
    enable_msix(fn)
    assert fn.msix_enabled()
    assert cfg_read(fn, MSIX_CAP_OFFSET + 2, 2) == 0x8000 | 63  # table size stays read-only
    fn.fire(3)
    fn.fire(3)
    assert signals(fd) == 2
    assert pba_bits(fn) == 0


def test_msix_vector_without_eventfd_goes_pending(fn: NvmePciFunction, irqs: FakeIrqLines) -> None:
    attach(fn, irqs)
    enable_msix(fn)
    fn.fire(5)
    assert pba_bits(fn) == 1 << 5
    fd = irqs.assign(PCI_MSIX_IRQ_INDEX, 5)
    fn.irqs_changed(PCI_MSIX_IRQ_INDEX)  # SET_IRQS assigned the vector
    assert signals(fd) == 1
    assert pba_bits(fn) == 0
    fn.fire(64)  # outside the table: ignored
    assert pba_bits(fn) == 0


def test_msix_function_mask(fn: NvmePciFunction, irqs: FakeIrqLines) -> None:
    attach(fn, irqs)
    fd = irqs.assign(PCI_MSIX_IRQ_INDEX, 0)
    enable_msix(fn, mask_all=True)
    fn.fire(0)
    assert signals(fd) == 0 and pba_bits(fn) == 1
    enable_msix(fn)  # clear Function Mask: the pending message is sent
    assert signals(fd) == 1 and pba_bits(fn) == 0


def test_msix_table_storage_and_pba_read_only(fn: NvmePciFunction) -> None:
    entry = struct.pack("<IIII", 0xFEE00000, 0, 0x4021, 0)
    fn.region_write(BAR0, 0x2000 + 16 * 2, entry)
    assert fn.region_read(BAR0, 0x2000 + 16 * 2, 16) == entry
    assert fn.msix.entry(2) == (0xFEE00000, 0, 0x4021, 0)
    assert fn.msix.vector_masked(1) and not fn.msix.vector_masked(2)  # reset value: masked
    assert fn.region_read(BAR0, 0x2000 + 16 * 64, 16) == bytes(16)  # past the last entry
    fn.region_write(BAR0, 0x3000, b"\xff" * 8)
    assert pba_bits(fn) == 0


# -- INTx ----------------------------------------------------------------------------------
def test_intx_automasked_until_unmask(fn: NvmePciFunction, irqs: FakeIrqLines) -> None:
    attach(fn, irqs)
    fd = irqs.assign(PCI_INTX_IRQ_INDEX, 0)
    fn.fire(0)
    assert signals(fd) == 1
    assert cfg_read(fn, r.PCI_STATUS, 2) & r.PCI_STATUS_INTERRUPT
    fn.fire(1)  # masked until UNMASK: remembered, not sent
    assert signals(fd) == 0
    fn.irqs_changed(PCI_INTX_IRQ_INDEX)  # UNMASK (guest EOI)
    assert signals(fd) == 1
    fn.irqs_changed(PCI_INTX_IRQ_INDEX)
    assert signals(fd) == 0  # nothing pending any more
    assert not cfg_read(fn, r.PCI_STATUS, 2) & r.PCI_STATUS_INTERRUPT


def test_intx_disable_bit_and_msix_take_over(fn: NvmePciFunction, irqs: FakeIrqLines) -> None:
    attach(fn, irqs)
    fd = irqs.assign(PCI_INTX_IRQ_INDEX, 0)
    cfg_write(fn, r.PCI_COMMAND, 2, r.PCI_COMMAND_INTX_DISABLE)
    fn.fire(0)
    assert signals(fd) == 0
    cfg_write(fn, r.PCI_COMMAND, 2, 0)  # re-enabled: the pending interrupt goes out
    assert signals(fd) == 1
    fn.irqs_changed(PCI_INTX_IRQ_INDEX)
    enable_msix(fn)
    fn.fire(0)
    assert signals(fd) == 0  # MSI-X on: never INTx


def test_intx_client_mask_state_is_honoured(fn: NvmePciFunction) -> None:
    irqs = MaskingIrqLines()
    try:
        attach(fn, irqs)
        fd = irqs.assign(PCI_INTX_IRQ_INDEX, 0)
        irqs.mask_state[(PCI_INTX_IRQ_INDEX, 0)] = True  # NONE|MASK
        fn.irqs_changed(PCI_INTX_IRQ_INDEX)
        fn.fire(0)
        assert signals(fd) == 0
        irqs.mask_state[(PCI_INTX_IRQ_INDEX, 0)] = False  # NONE|UNMASK
        fn.irqs_changed(PCI_INTX_IRQ_INDEX)
        assert signals(fd) == 1
    finally:
        irqs.close()


def test_interrupts_without_client_are_kept(fn: NvmePciFunction, irqs: FakeIrqLines) -> None:
    enable_msix(fn)
    fn.fire(7)
    assert pba_bits(fn) == 1 << 7
    fd = irqs.assign(PCI_MSIX_IRQ_INDEX, 7)
    attach(fn, irqs)
    assert signals(fd) == 1


# -- BAR0 forwarding ----------------------------------------------------------------------
def test_bar0_forwarding_and_splitting(fn: NvmePciFunction) -> None:
    dev = FakeMmio()
    fn.bind(dev)
    fn.region_write(BAR0, 0x14, (0x00460001).to_bytes(4, "little"))  # CC
    assert dev.calls[-1] == ("w", 0x14, 4, 0x00460001)
    fn.region_write(BAR0, 0x28, (0x1_2345_6000).to_bytes(8, "little"))  # ASQ as one qword
    assert dev.calls[-1] == ("w", 0x28, 8, 0x1_2345_6000)
    dev.calls.clear()
    fn.region_write(BAR0, 0x1000, bytes(range(16)))  # 16-byte write: two LE qwords
    assert dev.calls == [("w", 0x1000, 8, 0x0706050403020100), ("w", 0x1008, 8, 0x0F0E0D0C0B0A0908)]
    dev.calls.clear()
    assert fn.region_read(BAR0, 0x0, 8) == (0x1122334455667788).to_bytes(8, "little")
    assert dev.calls == [("r", 0, 8)]
    dev.calls.clear()
    data = fn.region_read(BAR0, 0x1, 3)  # 3 bytes: 1 + 2
    assert dev.calls == [("r", 1, 1), ("r", 2, 2)]
    assert data == b"\x88\x88\x77"
    # An access straddling the NVMe window and the MSI-X table is split by area.
    dev.calls.clear()
    fn.region_write(BAR0, 0x1FFC, b"\xaa" * 8)
    assert dev.calls == [("w", 0x1FFC, 4, 0xAAAAAAAA)]
    assert fn.region_read(BAR0, 0x2000, 4) == b"\xaa" * 4
    with pytest.raises(ValueError):
        fn.region_read(BAR0, 0x3FFC, 8)


def test_bar0_without_device_reads_zero() -> None:
    fn = NvmePciFunction()
    assert fn.region_read(BAR0, 0x0, 8) == bytes(8)
    fn.region_write(BAR0, 0x14, b"\x01\x00\x00\x00")


def test_split_access() -> None:
    assert split_access(0x10, 4) == [(0x10, 4)]
    assert split_access(0x3, 8) == [(0x3, 8)]  # a 1/2/4/8 access goes through as is
    assert split_access(0x0, 16) == [(0, 8), (8, 8)]
    assert split_access(0x4, 12) == [(4, 4), (8, 8)]
    assert split_access(0x1, 6) == [(1, 1), (2, 2), (4, 2), (6, 1)]


# -- resets and connection --------------------------------------------------------------------
def dirty(fn: NvmePciFunction) -> None:
    cfg_write(fn, r.PCI_COMMAND, 2, 0x0406)
    cfg_write(fn, r.PCI_BASE_ADDRESS_0, 4, 0xFEBF0000)
    cfg_write(fn, r.PCI_INTERRUPT_LINE, 1, 11)
    cfg_write(fn, PM_CAP_OFFSET + r.PCI_PM_CTRL, 2, 3)
    cfg_write(fn, PCIE_CAP_OFFSET + r.PCI_EXP_DEVCTL, 2, 0x2830)  # MPS 256 B
    enable_msix(fn, mask_all=True)
    fn.region_write(BAR0, 0x2000, b"\x01" * 16)


def test_device_reset_restores_power_on_state(fn: NvmePciFunction) -> None:
    dev = FakeMmio()
    fn.bind(dev)
    power_on = fn.region_read(CFG, 0, 4096)
    dirty(fn)
    fn.reset()
    assert fn.region_read(CFG, 0, 4096) == power_on
    assert not fn.msix_enabled()
    assert fn.msix.vector_masked(0)
    assert dev.resets == 1


def test_flr_via_device_control(fn: NvmePciFunction) -> None:
    dev = FakeMmio()
    fn.bind(dev)
    power_on = fn.region_read(CFG, 0, 4096)
    dirty(fn)
    devctl = PCIE_CAP_OFFSET + r.PCI_EXP_DEVCTL
    cfg_write(fn, devctl, 2, cfg_read(fn, devctl, 2) | r.PCI_EXP_DEVCTL_BCR_FLR)
    assert dev.resets == 1
    assert cfg_read(fn, r.PCI_COMMAND, 2) == 0
    assert cfg_read(fn, r.PCI_BASE_ADDRESS_0, 4) == r.PCI_BASE_ADDRESS_MEM_TYPE_64
    assert cfg_read(fn, PM_CAP_OFFSET + r.PCI_PM_CTRL, 2) & 3 == 0
    assert not fn.msix_enabled()
    # Initiate FLR reads 0; Max_Payload_Size survives FLR (PCIe §6.6.2).
    assert cfg_read(fn, devctl, 2) == 0x2830 & ~0x8000
    fn.region_write(CFG, devctl, (0x2810).to_bytes(2, "little"))
    assert fn.region_read(CFG, 0, 4096) == power_on
    # A byte write of the upper DevCtl byte also starts an FLR.
    cfg_write(fn, devctl + 1, 1, 0x80)
    assert dev.resets == 2


def test_attach_detach_memory(fn: NvmePciFunction, irqs: FakeIrqLines) -> None:
    dev = FakeMmio()
    mem = MappedMemory()
    fn.attach(mem, irqs)
    fn.bind(dev)  # bound after attach: gets the memory at once
    assert dev.memory is mem
    cfg_write(fn, r.PCI_COMMAND, 2, 0x6)
    fn.detach()
    assert dev.memory is None
    assert cfg_read(fn, r.PCI_COMMAND, 2) == 0x6  # state kept across reconnects
    fn.attach(mem, irqs)
    assert dev.memory is mem


# -- state --------------------------------------------------------------------------------------
def test_state_round_trip(fn: NvmePciFunction) -> None:
    dirty(fn)
    fn.fire(9)  # function-masked: pending
    state = fn.save_state()
    blob = json.dumps(state.to_dict())
    other = NvmePciFunction()
    other.load_state(PciFunctionState.from_dict(json.loads(blob)))
    assert other.region_read(CFG, 0, 4096) == fn.region_read(CFG, 0, 4096)
    assert other.region_read(BAR0, 0x2000, 0x2000) == fn.region_read(BAR0, 0x2000, 0x2000)
    assert other.msix.pending_vectors() == [9]
    assert other.save_state() == state


def test_state_mismatch_rejected(fn: NvmePciFunction) -> None:
    state = fn.save_state()
    with pytest.raises(ValueError):
        NvmePciFunction(msix_vectors=32).load_state(state)
    with pytest.raises(ValueError):
        NvmePciFunction(vendor_id=0x1234).load_state(state)
    with pytest.raises(ValueError):
        PciFunctionState.from_dict({"version": 99})
    with pytest.raises(ValueError):
        PciFunctionState.from_dict({"version": 1})


# -- layout -------------------------------------------------------------------------------------
def test_large_msix_table_grows_bar0() -> None:
    fn = NvmePciFunction(msix_vectors=2048)
    lay = fn.layout
    assert (lay.table_offset, lay.pba_offset, lay.bar_size) == (0x2000, 0xA000, 0x10000)
    assert cfg_read(fn, MSIX_CAP_OFFSET + 2, 2) == 2047
    assert cfg_read(fn, MSIX_CAP_OFFSET + 8, 4) == 0xA000
    cfg_write(fn, r.PCI_BASE_ADDRESS_0, 4, 0xFFFFFFFF)
    assert cfg_read(fn, r.PCI_BASE_ADDRESS_0, 4) == 0xFFFF0004
    assert fn.irq_info(PCI_MSIX_IRQ_INDEX).count == 2048
    assert Bar0Layout(256).bar_size == 0x4000 and Bar0Layout(257).bar_size == 0x8000
    for bad in (0, 2049):
        with pytest.raises(ValueError):
            NvmePciFunction(msix_vectors=bad)
    with pytest.raises(ValueError):
        NvmePciFunction(vendor_id=0xFFFF)


# -- with the real NVMe controller behind BAR0 -----------------------------------------------------
def test_nvme_controller_behind_bar0(fn: NvmePciFunction, irqs: FakeIrqLines) -> None:
    from emulator.nvme.config import ControllerConfig
    from emulator.nvme.dispatch import new_controller
    from emulator.subsystem.subsystem import Subsystem

    ctrl = new_controller(ControllerConfig(cntlid=1), Subsystem(), irq=fn)
    fn.bind(ctrl)
    ram = os.memfd_create("guest-ram")
    try:
        os.ftruncate(ram, 1 << 20)
        mem = MappedMemory()
        mem.add(0, 1 << 20, ram)
        vector0 = irqs.assign(PCI_MSIX_IRQ_INDEX, 0)
        fn.attach(mem, irqs)
        cfg_write(fn, r.PCI_COMMAND, 2, r.PCI_COMMAND_MEMORY | r.PCI_COMMAND_MASTER)
        enable_msix(fn)

        def mmio_write(offset: int, size: int, value: int) -> None:
            fn.region_write(BAR0, offset, value.to_bytes(size, "little"))

        mmio_write(0x24, 4, 3 << 16 | 3)  # AQA: 4-entry admin queues
        mmio_write(0x28, 8, 0x10000)  # ASQ, one qword as QEMU forwards it
        mmio_write(0x30, 8, 0x20000)  # ACQ
        mmio_write(0x14, 4, 0x00460001)  # CC.EN, IOSQES 6, IOCQES 4
        assert int.from_bytes(fn.region_read(BAR0, 0x1C, 4), "little") & 1  # CSTS.RDY
        identify = struct.pack("<BBHI16xQQI20x", 0x06, 0, 7, 0, 0x30000, 0, 1)  # CNS 1
        mem.write(0x10000, identify)
        mmio_write(0x1000, 4, 1)  # SQ0 tail doorbell
        dw0, dw1, sqhd, sqid, cid, status = struct.unpack("<IIHHHH", mem.read(0x20000, 16))
        assert (sqhd, sqid, cid, status >> 1) == (1, 0, 7, 0)
        assert signals(vector0) == 1
        fn.reset()
        assert not int.from_bytes(fn.region_read(BAR0, 0x1C, 4), "little") & 1  # CLR: not ready
    finally:
        fn.detach()
        os.close(ram)
