"""Visible device writes (dmawrite.py): DMA_WRITE requests, ordering, interrupts after the replies."""
from __future__ import annotations

import os

import pytest

from emulator.memory import MappedMemory
from emulator.vfio_user import messages as m
from emulator.vfio_user.dmawrite import BOOT_LIMIT, VisibleWrites


class Irqs:
    def __init__(self) -> None:
        self.fired: list[tuple[int, int]] = []

    def trigger(self, index: int, subindex: int) -> bool:
        self.fired.append((index, subindex))
        return True

    def assigned(self, index: int, subindex: int) -> bool:
        return True

    def masked(self, index: int, subindex: int) -> bool:
        return False


@pytest.fixture
def mem():
    fd = os.memfd_create("dmawrite-test")
    os.ftruncate(fd, 4 << 20)
    memory = MappedMemory()
    memory.add(0, 4 << 20, fd)
    yield memory
    memory.clear()
    os.close(fd)


def _sent(vw: VisibleWrites, first_id: int = 100) -> list[m.Message]:
    msgs = vw.take_requests()
    for i, msg in enumerate(msgs):
        msg.msg_id = first_id + i   # what the codec does when it sends them
    vw.sent()
    return msgs


def test_boot_mode_sends_low_writes_then_everything_until_acknowledged(mem):
    notified, irqs = [], Irqs()
    vw = VisibleWrites(mem, irqs, "boot", notify=lambda: notified.append(1), max_xfer=4096)
    vw.write(0x2000_00, b"high")                       # above 1 MiB, nothing pending: through the mmap
    assert mem.read(0x2000_00, 4) == b"high" and not vw.pending
    vw.write(0x7C00, b"A" * 5000)                      # below 1 MiB: by message
    vw.write(0x3000_00, b"cqe!")                       # after it, in order: by message too
    assert notified == [1] and vw.pending
    assert mem.read(0x7C00, 1) == b"\0"                # not stored directly
    assert vw.read(0x7C00 + 4990, 20) == b"A" * 10 + b"\0" * 10   # the device sees its own writes
    vw.trigger(2, 0)
    assert irqs.fired == []                            # interrupts wait for the replies
    msgs = _sent(vw)
    assert [(x.address, len(x.data)) for x in msgs] == [(0x7C00, 4096), (0x7C00 + 4096, 904), (0x3000_00, 4)]
    assert all(type(x) is m.DmaWriteRequest for x in msgs)
    for x in msgs[:-1]:
        mem.write(x.address, x.data)                   # the client performs them
        assert vw.acknowledge(x.msg_id)
        assert irqs.fired == []
    mem.write(msgs[-1].address, msgs[-1].data)
    assert vw.acknowledge(msgs[-1].msg_id)
    assert irqs.fired == [(2, 0)] and not vw.pending
    assert not vw.acknowledge(12345)                   # not ours


def test_refused_write_is_stored_through_the_mmap(mem):
    irqs = Irqs()
    vw = VisibleWrites(mem, irqs, "all", notify=lambda: None, max_xfer=1 << 20)
    vw.write(BOOT_LIMIT + 64, b"data")
    (msg,) = _sent(vw)
    vw.trigger(2, 1)
    assert vw.acknowledge(msg.msg_id, error=14)
    assert mem.read(BOOT_LIMIT + 64, 4) == b"data" and irqs.fired == [(2, 1)]


def test_off_mode_is_refused():
    with pytest.raises(ValueError):
        VisibleWrites(MappedMemory(), Irqs(), "sometimes", notify=lambda: None, max_xfer=4096)  # type: ignore[arg-type]


def test_dma_write_reply_forms():
    assert m.DmaWriteReply.decode(memoryview(b""), []) == m.DmaWriteReply(0, 0)   # bare header
    assert m.DmaWriteReply.decode(memoryview(bytes(16)), []) == m.DmaWriteReply(0, 0)


def test_store_now_bypasses_pending_messages(mem):
    """Shadow-doorbell EventIdx stores must reach the host at once, even behind queued writes."""
    vw = VisibleWrites(mem, Irqs(), "all", notify=lambda: None, max_xfer=4096)
    vw.write(0x5000, b"\0" * 16)
    vw.store_now(0x5004, b"\x07\0\0\0")
    assert mem.read(0x5004, 4) == b"\x07\0\0\0"
    (msg,) = _sent(vw)
    assert msg.data[4:8] == b"\x07\0\0\0"             # the queued write does not undo it
