"""DMA_MAP/DMA_UNMAP at any time never leave the controller with stale memory or lose a command (issue 16).

QEMU remaps guest RAM while SeaBIOS runs (PAM changes of 0xc0000-0xfffff): one
listener transaction unmaps the RAM section, then maps the pieces in address
order -- read-write with the memfd, read-only with the memfd, read-only without
an fd (ROM) -- and later merges them back the same way.  Here the pieces cut
through the memory that holds the admin and I/O queues.
"""
from __future__ import annotations

import os

from emulator.host.driver import CQE, CQE_SIZE, DOORBELL_BASE, Completion
from emulator.nvme.spec import Generic, IoOpcode

MIB = 1 << 20
RO_AT, ROM_AT, ROM_SIZE = 24 * MIB, 26 * MIB, 2 * MIB   # offsets in host memory, above what the tests allocate


def _pieces(h, split: int) -> list[tuple[int, int, bool, bool]]:
    """QEMU-like pieces of the host memory: (offset, size, writable, with fd)."""
    size = h.mem.size
    return [(0, split, True, True), (split, RO_AT - split, True, True), (RO_AT, ROM_AT - RO_AT, False, True),
            (ROM_AT, ROM_SIZE, False, False), (ROM_AT + ROM_SIZE, size - ROM_AT - ROM_SIZE, True, True)]


def split_ram(h, split: int) -> None:
    """Unmap the whole host memory, then map it again in pieces, in address order."""
    c, mem = h.t.client, h.mem
    c.dma_unmap(mem.iova, mem.size)
    for off, size, writable, with_fd in _pieces(h, split):
        c.dma_map(mem.iova + off, size, fd=mem.fd if with_fd else None, offset=off if with_fd else 0,
                  flags=0x3 if writable else 0x1)


def merge_ram(h, split: int) -> None:
    """Unmap the pieces, then map the whole memory read-write again."""
    c, mem = h.t.client, h.mem
    for off, size, _, _ in _pieces(h, split):
        c.dma_unmap(mem.iova + off, size)
    c.dma_map(mem.iova, mem.size, fd=mem.fd, offset=0, flags=0x3)


def take_cqes_without_doorbell(h, qid: int) -> list[Completion]:
    """Consume new CQEs but do not ring the CQ head doorbell: the controller still sees a full CQ."""
    q, got = h.queues[qid], []
    while True:
        dw0, dw1, sqhd, sqid, cid, sf = CQE.unpack(h.mem.read(q.cq_iova + q.cq_head * CQE_SIZE, CQE_SIZE))
        if (sf & 1) != q.phase:
            return got
        got.append(Completion(dw0, dw1, sqhd, sqid, cid, sf >> 1))
        q.outstanding.pop(cid, None)
        q.cq_head = (q.cq_head + 1) % q.size
        q.phase ^= int(q.cq_head == 0)


def _csts(h) -> int:
    return h.t.mmio_read(0x1C, 4)


def test_remap_between_commands(emu):
    h = emu().host(qsize=16)
    split = h.queues[1].cq_iova - h.mem.iova          # I/O SQ and CQ end up in different pieces
    data = os.urandom(8192)
    assert h.write(1, 100, data).ok
    for _ in range(3):
        split_ram(h, split)
        assert h.read(1, 100, 16).data == data        # admin and I/O queues used across the cut
        assert h.identify(cns=1)[:2] != b"\0\0"
        more = os.urandom(4096)
        assert h.write(1, 300, more).ok and h.read(1, 300, 8).data == more
        # the new maps are in force, not the old read-write one
        ro = h.read(1, 100, 1, prp1=h.mem.iova + RO_AT)
        rom = h.read(1, 100, 1, prp1=h.mem.iova + ROM_AT)
        assert (ro.sct, ro.sc) == (0, Generic.DATA_TRANSFER_ERROR)
        assert (rom.sct, rom.sc) == (0, Generic.DATA_TRANSFER_ERROR)
        assert h.command(1, IoOpcode.WRITE, nsid=1, prp1=h.mem.iova + RO_AT, cdw10=500, cdw12=0).ok  # reads RO
        merge_ram(h, split)
        assert h.read(1, 100, 16).data == data
        assert h.read(1, 100, 1, prp1=h.mem.iova + RO_AT).ok
    assert _csts(h) & 0x2 == 0


def test_doorbell_while_the_queue_memory_is_unmapped(emu):
    """Commands submitted while their SQ and CQ are unmapped wait, and run once the map is back."""
    h = emu().host(qsize=16)
    data = os.urandom(4096)
    assert h.write(1, 40, data).ok
    q, mem = h.queues[1], h.mem
    bufs = [mem.alloc(4096) for _ in range(4)]
    h.t.client.dma_unmap(mem.iova, mem.size)           # the first half of QEMU's transaction
    cids = [h.submit(1, IoOpcode.READ, nsid=1, prp1=b, cdw10=40, cdw12=7) for b in bufs]
    assert _csts(h) & 0x2 == 0                          # not a fatal error: nothing fetched yet
    for off, size, writable, with_fd in _pieces(h, q.cq_iova - mem.iova):
        h.t.client.dma_map(mem.iova + off, size, fd=mem.fd if with_fd else None,
                           offset=off if with_fd else 0, flags=0x3 if writable else 0x1)
    for cid, b in zip(cids, bufs):
        assert h.wait(1, cid).ok
        assert mem.read(b, 4096) == data
    assert _csts(h) & 0x2 == 0


def test_remap_while_commands_wait_for_cq_space(emu):
    """SQ entries the controller has not fetched (its CQ is full) survive a remap of both queues."""
    h = emu().host(qsize=4)                              # CQ holds 3 entries
    q, mem = h.queues[1], h.mem
    data = os.urandom(512)
    assert h.write(1, 7, data).ok
    first = [h.submit(1, IoOpcode.READ, nsid=1, prp1=mem.alloc(4096), cdw10=7) for _ in range(3)]
    got = []
    while len(got) < 3:
        got += take_cqes_without_doorbell(h, 1)
    assert {c.cid for c in got} == set(first)
    bufs = [mem.alloc(4096) for _ in range(3)]
    waiting = [h.submit(1, IoOpcode.READ, nsid=1, prp1=b, cdw10=7) for b in bufs]  # CQ full: not fetched
    split_ram(h, q.sq_iova - mem.iova + 4096)            # cut between the SQ and the CQ
    merge_ram(h, q.sq_iova - mem.iova)                   # unmaps along other cuts: maps are cut (VFIO type1)
    split_ram(h, q.cq_iova - mem.iova)
    h.t.mmio_write(DOORBELL_BASE + (2 * 1 + 1) * 4, 4, q.cq_head)   # free the CQ slots
    for cid, b in zip(waiting, bufs):
        assert h.wait(1, cid).ok
        assert mem.read(b, 512) == data
    assert _csts(h) & 0x2 == 0
