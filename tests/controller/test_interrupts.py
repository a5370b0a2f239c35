"""MSI-X per CQ, interrupt coalescing (FID 08h/09h) and INTMS/INTMC (issue 2)."""
from __future__ import annotations

import os
import select
import tempfile
from pathlib import Path

from emulator.host.driver import NvmeHost
from emulator.host.memory import HostMemory
from emulator.host.transport import DirectTransport
from emulator.nvme.config import ControllerConfig, NamespaceConfig
from emulator.nvme.dispatch import new_controller
from emulator.nvme.namespace import Namespace
from emulator.nvme.spec import FID, IoOpcode
from emulator.subsystem.subsystem import Subsystem


def _count(fd: int) -> int:
    """Read an eventfd's counter once it is signalled (0 if it never is)."""
    r, _, _ = select.select([fd], [], [], 2.0)
    if not r:
        return 0
    return int.from_bytes(os.read(fd, 8), "little")


def _submit_batch(h: NvmeHost, qid: int, n: int) -> list[int]:
    buf = h.mem.alloc(4096)
    cids = [h.submit(qid, IoOpcode.READ, 1, buf, 0, cdw10=i, ring=False) for i in range(n)]
    h.ring_sq(qid)
    return cids


def test_one_vector_per_cq(emu):
    h = emu().host(io_queues=3)
    for qid in (1, 2, 3):
        cids = _submit_batch(h, qid, 1)
        assert _count(h.t.eventfds[qid]) == 1
        assert h.wait(qid, cids[0]).ok
    for qid in (1, 2, 3):
        assert not select.select([h.t.eventfds[qid]], [], [], 0)[0]


def test_a_batch_raises_one_interrupt(emu):
    h = emu().host(qsize=64)
    cids = _submit_batch(h, 1, 16)
    assert _count(h.t.eventfds[1]) == 1
    assert all(h.wait(1, c).ok for c in cids)


def test_coalescing_threshold_and_time(emu):
    h = emu().host(qsize=64)
    # THR = 4 entries (0's based 3), TIME = 5 x 100 us
    h.set_features(FID.INTERRUPT_COALESCING, (5 << 8) | 3)
    cids = _submit_batch(h, 1, 1)
    # Below the threshold the interrupt still comes, once the aggregation time is over.
    assert _count(h.t.eventfds[1]) == 1
    h.wait(1, cids[0])
    cids = _submit_batch(h, 1, 8)
    assert _count(h.t.eventfds[1]) >= 1
    assert all(h.wait(1, c).ok for c in cids)
    # Coalescing Disable for the vector (FID 09h CD) and the admin queue never coalesce.
    h.set_features(FID.INTERRUPT_VECTOR_CONFIG, (1 << 16) | 1)
    assert h.get_features(FID.INTERRUPT_VECTOR_CONFIG, cdw11=1).dw0 == (1 << 16) | 1
    cids = _submit_batch(h, 1, 1)
    assert _count(h.t.eventfds[1]) == 1
    h.wait(1, cids[0])


class PinSink:
    def __init__(self) -> None:
        self.fired: list[int] = []

    def fire(self, vector: int) -> None:
        self.fired.append(vector)

    def msix_enabled(self) -> bool:
        return False


def test_intms_intmc_mask_pin_interrupts():
    d = Path(tempfile.mkdtemp(prefix="ne-"))
    sub = Subsystem()
    sub.namespaces[1] = Namespace(NamespaceConfig(1, d / "ns.img", 1 << 20), sub.nqn)
    sink = PinSink()
    ctrl = new_controller(ControllerConfig(1, namespaces=(1,)), sub, irq=sink)
    sub.controllers[1] = ctrl
    mem = HostMemory(4 << 20)
    t = DirectTransport(ctrl, mem)
    h = NvmeHost(t)
    h.init(io_queues=1)
    sink.fired.clear()
    t.mmio_write(0x0C, 4, 0x1)  # INTMS: mask vector 0
    assert h.admin(0x18).ok  # Keep Alive completes on the admin CQ (vector 0)
    assert 0 not in sink.fired
    assert ctrl.mmio_read(0x0C, 4) & 1 and ctrl.mmio_read(0x10, 4) & 1
    t.mmio_write(0x10, 4, 0x1)  # INTMC: unmask -> the held interrupt is delivered
    assert sink.fired == [0]
    assert ctrl.mmio_read(0x0C, 4) & 1 == 0
    sub.close()
