"""What the message path prepares and caches (issue 12) behaves exactly as before.

The PCI function keeps, per BAR0 offset, the controller's prepared doorbell
handler (``Controller.mmio_writer``), and a copy of the MSI-X Message Control
word; the controller skips ``flush_interrupts`` when no CQ has a pending count
and handles an I/O CQ head doorbell with nothing held in a few steps; the
arbiter runs a lone SQ's first burst inline.  Each test changes what those
depend on between two doorbells and checks the second one.
"""
from __future__ import annotations

import os
import select
import time

from emulator.host.driver import NvmeHost
from emulator.nvme.spec import AdminOpcode, DOORBELL_BASE, IoOpcode
from emulator.pci import regs as r
from emulator.pci.capabilities import MSIX_CAP_OFFSET
from emulator.vfio_user.protocol import PCI_CONFIG_REGION_INDEX

MSIX_CTRL = MSIX_CAP_OFFSET + r.PCI_MSIX_FLAGS


def _signalled(fd: int, timeout: float = 2.0) -> int:
    """The eventfd's counter once signalled within ``timeout`` (0 if not); resets it."""
    if not select.select([fd], [], [], timeout)[0]:
        return 0
    return int.from_bytes(os.read(fd, 8), "little")


def _read_cmd(h: NvmeHost, qid: int = 1) -> int:
    """Submit (and ring) one 512-byte Read on ``qid``; its CID."""
    return h.submit(qid, IoOpcode.READ, 1, h.mem.alloc(4096), 0, cdw10=0)


def _config(h: NvmeHost, offset: int, size: int, value: int | None = None) -> int:
    if value is not None:
        h.t.client.region_write(PCI_CONFIG_REGION_INDEX, offset, value.to_bytes(size, "little"))
    return int.from_bytes(h.t.client.region_read(PCI_CONFIG_REGION_INDEX, offset, size), "little")


def _ctrl(e, cntlid: int = 1):
    return e.subsystem.controllers[cntlid]


def test_doorbells_take_the_prepared_handlers(emu) -> None:
    e = emu()
    h = e.host()
    fn = e.rt.runtime.functions[1]
    assert h.read(1, 0, 1).ok
    sq1, cq1 = DOORBELL_BASE + 8, DOORBELL_BASE + 12
    deadline = time.monotonic() + 5  # (the CQ head doorbell is posted: it may still be on its way)
    while not callable(fn._writers.get(cq1)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert callable(fn._writers.get(sq1)) and callable(fn._writers.get(cq1))
    assert fn._writers.get(0x14, False) is False  # CC is no doorbell: mmio_write as before
    ctrl = _ctrl(e)
    assert ctrl.mmio_writer(sq1, 4) is not None and ctrl.mmio_writer(sq1, 8) is None
    assert ctrl.mmio_writer(sq1 + 1, 4) is None and ctrl.mmio_writer(0x14, 4) is None


def test_bus_master_and_memory_space_off_between_two_doorbells(emu) -> None:
    """Neither is a gate (pci/function.py): the second doorbell still runs its command."""
    h = emu().host()
    assert h.read(1, 0, 1).ok
    cmd = _config(h, r.PCI_COMMAND, 2)
    assert cmd & (r.PCI_COMMAND_MASTER | r.PCI_COMMAND_MEMORY)
    _config(h, r.PCI_COMMAND, 2, cmd & ~(r.PCI_COMMAND_MASTER | r.PCI_COMMAND_MEMORY))
    assert h.read(1, 0, 1).ok
    _config(h, r.PCI_COMMAND, 2, cmd)
    assert h.read(1, 0, 1).ok


def test_msix_function_mask_and_disable_between_two_doorbells(emu) -> None:
    e = emu()
    h = e.host()
    fn = e.rt.runtime.functions[1]
    efd = h.t.eventfds[1]
    assert h.read(1, 0, 1).ok
    _signalled(efd, 0.5)  # the interrupt of that read
    ctl = _config(h, MSIX_CTRL, 2)
    # Function Mask set: the completion comes, its interrupt stays pending in the PBA.
    _config(h, MSIX_CTRL, 2, ctl | r.PCI_MSIX_FLAGS_MASKALL)
    assert fn.msix_function_masked()
    cid = _read_cmd(h)
    assert h.wait(1, cid).ok
    assert _signalled(efd, 0.2) == 0
    assert e.call(fn.msix.pending_vectors) == [1]
    # Mask cleared: the pending interrupt is delivered at once; the next one as usual.
    _config(h, MSIX_CTRL, 2, ctl)
    assert _signalled(efd) == 1 and e.call(fn.msix.pending_vectors) == []
    cid = _read_cmd(h)
    assert _signalled(efd) == 1 and h.wait(1, cid).ok
    # MSI-X Enable cleared: INTx (which this client did not set up) instead of the eventfd.
    _config(h, MSIX_CTRL, 2, ctl & ~r.PCI_MSIX_FLAGS_ENABLE)
    assert not fn.msix_enabled()
    cid = _read_cmd(h)
    assert h.wait(1, cid).ok
    assert _signalled(efd, 0.2) == 0
    assert fn._intx_pending  # fired on INTx, kept pending (no INTx eventfd)
    _config(h, MSIX_CTRL, 2, ctl)
    assert fn.msix_enabled()
    cid = _read_cmd(h)
    assert _signalled(efd) == 1 and h.wait(1, cid).ok


def test_msix_copy_follows_resets_and_loaded_state(emu) -> None:
    e = emu()
    h = e.host()
    fn = e.rt.runtime.functions[1]
    assert fn.msix_enabled()
    saved = e.call(fn.save_state)
    e.call(fn.reset)  # DEVICE_RESET: MSI-X disabled with the rest of the config space
    assert not fn.msix_enabled() and _config(h, MSIX_CTRL, 2) & r.PCI_MSIX_FLAGS_ENABLE == 0
    e.call(fn.load_state, saved)
    assert fn.msix_enabled()
    e.call(fn.function_level_reset)
    assert not fn.msix_enabled()
    h.t.client.reset()  # DEVICE_RESET over vfio-user, then MSI-X enabled again by a config write
    assert not fn.msix_enabled()
    _config(h, MSIX_CTRL, 2, _config(h, MSIX_CTRL, 2) | r.PCI_MSIX_FLAGS_ENABLE)
    assert fn.msix_enabled()
    h.init()
    cid = _read_cmd(h)
    assert _signalled(h.t.eventfds[1]) == 1 and h.wait(1, cid).ok


def test_controller_reset_between_two_doorbells(emu) -> None:
    """The prepared handler looks the queue up at each write: after a Controller Level
    Reset the I/O SQ's doorbell is an Invalid Doorbell Register write, as before."""
    e = emu()
    h = e.host()
    assert h.read(1, 0, 1).ok
    h.disable()
    h.enable()
    aers = [h.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST) for _ in range(2)]
    h.t.mmio_write(DOORBELL_BASE + 8, 4, 1)  # SQ 1 is gone
    deadline = time.monotonic() + 5
    got = None
    while got is None and time.monotonic() < deadline:
        got = next((c for c in (h.poll(0, cid) for cid in aers) if c is not None), None)
    assert got is not None and got.ok and got.dw0 & 0x7 == 0  # an Error event
    assert (got.dw0 >> 8) & 0xFF == 0x00  # Invalid Doorbell Register
    h.create_io_queue_pair(1)
    assert h.read(1, 0, 1).ok  # the same prepared handler serves the new queue


def test_cq_head_doorbell_runs_sqs_that_waited_for_cq_space(emu) -> None:
    """A full CQ: the SQ's next commands wait; the CQ head doorbell (the fast case: an I/O
    CQ with nothing held) runs them, as before."""
    e = emu()
    h = e.host()
    h.delete_io_queue_pair(1)
    h.create_io_queue_pair(1, qsize=4)  # 3 usable CQ slots
    q = h.queues[1]
    buf = h.mem.alloc(4096)
    cids = [h.submit(1, IoOpcode.READ, 1, buf, 0, ring=False) for _ in range(3)]
    h.ring_sq(1)
    assert all(h.wait(1, c).ok for c in cids)  # reaped, CQ head doorbell rung
    ctrl = _ctrl(e)
    cq = ctrl.cqs[1]
    # Fill the CQ without ringing its head doorbell, then queue one more command.
    cids = [h.submit(1, IoOpcode.READ, 1, buf, 0, ring=False) for _ in range(3)]
    h.ring_sq(1)
    deadline = time.monotonic() + 5
    while e.call(lambda: cq.tail) != (q.cq_head + 3) % q.cq_size and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not cq.held
    sq = ctrl.sqs[1]
    q.outstanding.clear()  # (the host's SQ-full estimate; the commands are done)
    extra = h.submit(1, IoOpcode.READ, 1, buf, 0)
    time.sleep(0.1)
    assert e.call(lambda: sq.head != sq.tail)  # waits for CQ space
    got = h.reap(1)  # consumes 3 CQEs, rings the CQ head doorbell
    assert [c.cid for c in got] == cids
    assert h.wait(1, extra).ok


def test_interrupts_after_a_flush_with_nothing_pending(emu) -> None:
    """flush_interrupts skips when no CQ has a pending count; a coalescing timer's pending
    count keeps it deciding (FID 08h), and every completion still raises its interrupt."""
    from emulator.nvme.spec import FID
    e = emu()
    h = e.host()
    efd = h.t.eventfds[1]
    for _ in range(3):
        cid = _read_cmd(h)
        assert _signalled(efd) == 1 and h.wait(1, cid).ok  # the CQ head doorbell flushes nothing
    ctrl = _ctrl(e)
    assert not ctrl._irq_due
    h.set_features(FID.INTERRUPT_COALESCING, (2 << 8) | 7)  # 8 entries or 200 µs
    for _ in range(2):
        cid = _read_cmd(h)
        assert _signalled(efd) == 1 and h.wait(1, cid).ok  # by the aggregation time
    h.set_features(FID.INTERRUPT_COALESCING, 0)
    cid = _read_cmd(h)
    assert _signalled(efd) == 1 and h.wait(1, cid).ok
    assert not e.call(lambda: ctrl._irq_due)
