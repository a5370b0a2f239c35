"""A tiny fake device backend and fixtures running it behind a real server."""
from __future__ import annotations

import mmap
import os
from typing import Iterator

import pytest

from emulator.memory import MappedMemory
from emulator.vfio_user import protocol as p
from emulator.vfio_user.backend import DeviceInfo, IrqInfo, IrqLines, RegionInfo
from emulator.vfio_user.client import VfioUserClient
from emulator.vfio_user.testing import ServerThread

VENDOR_DEVICE = b"\x58\x4e\x01\x00"  # 4e58:0001
BAR0_SIZE = 0x4000
BAR2_SIZE = 0x2000
BOOM = 0x3F00  # BAR0 offset whose access raises RuntimeError (-> EIO)
IRQ_COUNTS = {p.PCI_INTX_IRQ_INDEX: 1, p.PCI_MSI_IRQ_INDEX: 0, p.PCI_MSIX_IRQ_INDEX: 16,
              p.PCI_ERR_IRQ_INDEX: 1, p.PCI_REQ_IRQ_INDEX: 0}


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.fixture
def efds() -> Iterator[list[int]]:
    """Real fds (the codec closes the ones it does not hand out)."""
    fds = [os.eventfd(0) for _ in range(4)]
    yield fds
    for fd in fds:
        if is_open(fd):
            os.close(fd)


def fired(fd: int) -> int:
    """Interrupts signalled on eventfd ``fd`` since the last call (non-blocking fd)."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def guest_ram(size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


class FakeBackend:
    """Config space, a trapped BAR0 and an mmappable BAR2 (memfd, one sparse area)."""

    def __init__(self) -> None:
        self.config = bytearray(4096)
        self.config[0:4] = VENDOR_DEVICE
        self.config[0x08:0x0C] = b"\x00\x02\x08\x01"  # class 010802
        self.config[0x3D] = 1  # INTA
        self.bar0 = bytearray(BAR0_SIZE)
        self.bar2_fd = os.memfd_create("fake-bar2")
        os.ftruncate(self.bar2_fd, BAR2_SIZE)
        self.memory: MappedMemory | None = None
        self.irqs: IrqLines | None = None
        self.attached = self.detached = self.resets = 0
        self.irq_changes: list[int] = []
        self.writes: list[tuple[int, int, bytes]] = []

    def close(self) -> None:
        os.close(self.bar2_fd)

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET, p.PCI_NUM_REGIONS, p.PCI_NUM_IRQS)

    def region_info(self, index: int) -> RegionInfo:
        rw = p.REGION_FLAG_READ | p.REGION_FLAG_WRITE
        if index == 0:
            return RegionInfo(rw, BAR0_SIZE)
        if index == 2:
            return RegionInfo(rw | p.REGION_FLAG_MMAP, BAR2_SIZE, fd=self.bar2_fd, sparse_areas=[(0x1000, 0x1000)])
        if index == p.PCI_CONFIG_REGION_INDEX:
            return RegionInfo(rw, len(self.config))
        if 0 <= index < p.PCI_NUM_REGIONS:
            return RegionInfo(0, 0)
        raise ValueError(f"no region {index}")

    def irq_info(self, index: int) -> IrqInfo:
        flags = p.IRQ_INFO_EVENTFD | (p.IRQ_INFO_MASKABLE | p.IRQ_INFO_AUTOMASKED if index == 0 else 0)
        return IrqInfo(flags, IRQ_COUNTS[index])

    def _region(self, index: int, offset: int, count: int) -> bytearray:
        buf = {0: self.bar0, p.PCI_CONFIG_REGION_INDEX: self.config}.get(index)
        if buf is None or offset + count > len(buf):
            raise ValueError(f"access to region {index} at 0x{offset:x}+{count}")
        if index == 0 and offset <= BOOM < offset + max(count, 1):
            raise RuntimeError("device exploded")
        return buf

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return bytes(self._region(index, offset, count)[offset:offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._region(index, offset, len(data))[offset:offset + len(data)] = data
        self.writes.append((index, offset, bytes(data)))

    def reset(self) -> None:
        self.resets += 1

    def attach(self, memory: MappedMemory, irqs: IrqLines) -> None:
        self.memory, self.irqs = memory, irqs
        self.attached += 1

    def detach(self) -> None:
        self.memory = self.irqs = None
        self.detached += 1

    def irqs_changed(self, index: int) -> None:
        self.irq_changes.append(index)


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    b = FakeBackend()
    yield b
    b.close()


@pytest.fixture
def server(backend: FakeBackend) -> Iterator[ServerThread]:
    with ServerThread(backend) as srv:
        yield srv
        assert srv.errors == [], "exceptions escaped into the server loop"


def connect(server: ServerThread, negotiate: bool = True, **kw: object) -> VfioUserClient:
    client = VfioUserClient(server.path, timeout=5.0, **kw)  # type: ignore[arg-type]
    if negotiate:
        client.negotiate()
    return client


@pytest.fixture
def client(server: ServerThread) -> Iterator[VfioUserClient]:
    with connect(server) as c:
        yield c


def assert_serves_fresh_client(server: ServerThread) -> None:
    """The server is alive and serves a new client normally: VERSION + a config read."""
    with connect(server) as c:
        assert c.region_read(p.PCI_CONFIG_REGION_INDEX, 0, 4) == VENDOR_DEVICE
    assert server.call(lambda: server.server._listener is not None)
