"""Doorbell Buffer Config (7Ch): shadow doorbells and EventIdx, as Linux uses them."""
from __future__ import annotations

import struct

from emulator.nvme.spec import CQE, CQE_SIZE, DOORBELL_BASE, SQE_SIZE, AdminOpcode, Generic, IoOpcode, pack_sqe

NEVER = 0xFFFFFFFF


def need_event(event_idx: int, new: int, old: int) -> bool:
    """Linux's nvme_dbbuf_need_event (u16 arithmetic)."""
    return ((new - event_idx - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class ShadowHost:
    """Drives I/O queue 1 the way Linux's nvme driver does with a doorbell buffer."""

    def __init__(self, h, db: int, ei: int) -> None:
        self.h, self.db, self.ei = h, db, ei
        self.q = h.queues[1]
        self.mmio = 0

    def _u32(self, addr: int) -> int:
        return struct.unpack("<I", self.h.mem.read(addr, 4))[0]

    def _update(self, off: int, value: int) -> None:
        old = self._u32(self.db + off)
        self.h.mem.write(self.db + off, struct.pack("<I", value))
        if need_event(self._u32(self.ei + off), value, old):
            self.mmio += 1
            self.h.t.mmio_write(DOORBELL_BASE + off, 4, value)

    def put(self, cid: int, ring: bool = True) -> None:
        q = self.q
        buf = self.h.mem.alloc(4096)
        self.h.mem.write(q.sq_iova + q.sq_tail * SQE_SIZE,
                         pack_sqe(IoOpcode.READ, cid, 1, buf, 0, cdw10=cid))
        q.sq_tail = (q.sq_tail + 1) % q.size
        if ring:
            self._update(8, q.sq_tail)

    def shadow_only(self) -> None:
        self.h.mem.write(self.db + 8, struct.pack("<I", self.q.sq_tail))

    def reap(self) -> list[int]:
        q, got = self.q, []
        while True:
            dw0, dw1, sqhd, sqid, cid, sf = CQE.unpack(self.h.mem.read(q.cq_iova + q.cq_head * CQE_SIZE, CQE_SIZE))
            if (sf & 1) != q.phase:
                break
            assert sf >> 1 == 0
            got.append(cid)
            q.cq_head = (q.cq_head + 1) % q.size
            if q.cq_head == 0:
                q.phase ^= 1
        if got:
            self._update(12, q.cq_head)
        return got


def _setup(emu, qsize=8):
    h = emu().host(qsize=qsize)
    db, ei = h.mem.alloc(4096), h.mem.alloc(4096)
    assert h.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=db, prp2=ei).ok
    return h, ShadowHost(h, db, ei)


def test_oacs_and_bad_buffers(emu):
    h = emu().host()
    assert struct.unpack_from("<H", h.identify(cns=1), 256)[0] & 0x100
    page = h.mem.alloc(4096)
    for p1, p2 in ((page + 8, page + 4096), (page, page), (0, page), (page, 0xDEAD000)):
        c = h.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=p1, prp2=p2)
        assert c.sc == Generic.INVALID_FIELD


def test_cq_head_needs_no_mmio_and_sq_always_rings(emu):
    h, s = _setup(emu, qsize=8)
    assert s._u32(s.ei + 12) == NEVER
    done = []
    for rnd in range(10):  # 10 x 5 commands through an 8-entry queue: many wraps
        for i in range(5):
            s.put(rnd * 5 + i)
        import time
        deadline = time.monotonic() + 5
        while len(done) < (rnd + 1) * 5 and time.monotonic() < deadline:
            done += s.reap()
    assert sorted(done) == list(range(50))
    # CQ head updates rang only at wraps (submissions racing with the
    # controller's EventIdx update may skip their MMIO: they are picked up anyway).
    assert s.mmio < 50 + 10


def test_submission_racing_with_eventidx_is_not_lost(emu):
    h, s = _setup(emu, qsize=16)
    s.put(1, ring=False)
    s.shadow_only()          # in the shadow buffer, no MMIO yet
    s.put(2, ring=False)     # and one more: the MMIO below names only the first
    s.shadow_only()
    h.t.mmio_write(DOORBELL_BASE + 8, 4, 1)
    import time
    got, deadline = [], time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        got += s.reap()
    assert sorted(got) == [1, 2]


def test_full_cq_arms_eventidx_and_resumes(emu):
    h, s = _setup(emu, qsize=4)  # CQ holds 3
    for i in range(3):
        s.put(i)
    import time
    time.sleep(0.05)
    s.put(3)  # CQ is full: the controller stops and arms the CQ EventIdx
    time.sleep(0.05)
    assert s._u32(s.ei + 12) != NEVER
    got, deadline = [], time.monotonic() + 5
    while len(got) < 4 and time.monotonic() < deadline:
        got += s.reap()
    assert sorted(got) == [0, 1, 2, 3]


def test_reset_turns_shadow_doorbells_off(emu):
    h, s = _setup(emu)
    h.disable()
    h.init()
    assert h.read(1, 0, 1).ok  # plain MMIO doorbells again


def test_stale_mmio_value_does_not_move_the_tail_back(emu):
    """A posted MMIO doorbell can arrive after the shadow tail moved on."""
    h, s = _setup(emu, qsize=16)
    for cid in (1, 2, 3):
        s.put(cid, ring=False)
    s.shadow_only()
    h.t.mmio_write(DOORBELL_BASE + 8, 4, 3)
    import time
    got, deadline = [], time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        got += s.reap()
    h.t.mmio_write(DOORBELL_BASE + 8, 4, 1)  # an old value, late
    time.sleep(0.1)
    assert sorted(got) == [1, 2, 3] and s.reap() == []
    s.put(4)
    deadline = time.monotonic() + 5
    while 4 not in got and time.monotonic() < deadline:
        got += s.reap()
    assert sorted(got) == [1, 2, 3, 4]


def test_eventidx_reaches_the_host_when_device_writes_go_by_message(emu):
    """--visible-writes all: data and CQEs travel as DMA_WRITE messages, but the SQ EventIdx
    must reach the host at once: a host that submits again before the messages are applied
    would read a stale EventIdx, skip the doorbell, and the command would never be seen."""
    import time
    h = emu(visible_writes="all").host(qsize=8, serve_dma=True)
    db, ei = h.mem.alloc(4096), h.mem.alloc(4096)
    assert h.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=db, prp2=ei).ok
    s, done = ShadowHost(h, db, ei), []
    for rnd in range(4):
        s.put(2 * rnd)                 # rings; the controller runs it, moves EventIdx to the new tail
        time.sleep(0.05)               # ... and queues the read data and CQE as messages (not served yet)
        s.put(2 * rnd + 1)             # rings only if it already sees that EventIdx
        deadline = time.monotonic() + 5
        while len(done) < 2 * rnd + 2 and time.monotonic() < deadline:
            h.t.serve_requests()
            done += s.reap()
    assert sorted(done) == list(range(8))
