"""Limits a host cannot get around: MDTS on every transfer, a CQ outside memory is fatal."""
from __future__ import annotations

from emulator.nvme.spec import AdminOpcode, Generic

MDTS5 = (1 << 5) * 4096  # the default mdts: 5


def get_log_page(h, lid: int, nbytes: int, prp1: int | None = None):  # type: ignore[no-untyped-def]
    numd = nbytes // 4 - 1
    return h.admin(AdminOpcode.GET_LOG_PAGE, cdw10=lid | ((numd & 0xFFFF) << 16), cdw11=numd >> 16,
                   prp1=prp1 if prp1 is not None else h.mem.alloc(4096))


def test_get_log_page_is_capped_at_mdts(emu) -> None:  # type: ignore[no-untyped-def]
    """NUMD asking for 1 GiB (or one dword past MDTS) is Invalid Field, before anything is built."""
    h = emu().host()
    buf = h.mem.alloc(MDTS5)
    for nbytes in (1 << 30, MDTS5 + 4):
        c = get_log_page(h, 0x02, nbytes, prp1=buf)
        assert (c.sct, c.sc) == (0, Generic.INVALID_FIELD), nbytes
    assert h.get_log_page(0x02, 512).ok
    assert h.read(1, 0, 1).ok


def test_cq_outside_memory_sets_cfs_once(emu, caplog) -> None:  # type: ignore[no-untyped-def]
    """A CQ whose memory is not mapped: the completion cannot be posted, which is a controller
    fatal status (CSTS.CFS), logged once, no traceback; a reset clears it."""
    from emulator.host.driver import HostQueue
    from emulator.nvme.spec import CSTS_CFS, REG_CSTS, IoOpcode
    h = emu().host(io_queues=2)
    h.delete_io_queue_pair(2)
    bad_cq = 0xDEAD0000
    sq = h.mem.alloc(64 * 64)
    assert h.admin(AdminOpcode.CREATE_IO_CQ, prp1=bad_cq, cdw10=(63 << 16) | 2, cdw11=0x1).ok
    assert h.admin(AdminOpcode.CREATE_IO_SQ, prp1=sq, cdw10=(63 << 16) | 2, cdw11=(2 << 16) | 0x1).ok
    h.queues[2] = HostQueue(2, 64, sq, bad_cq, 2)
    assert not h.t.mmio_read(REG_CSTS, 4) & CSTS_CFS
    caplog.clear()
    for _ in range(3):
        h.submit(2, IoOpcode.READ, nsid=1, prp1=h.mem.alloc(4096))
    h._wait_csts(CSTS_CFS, CSTS_CFS)
    fatal = [r for r in caplog.records if "fatal" in r.getMessage()]
    assert len(fatal) == 1 and fatal[0].exc_info is None
    assert not [r for r in caplog.records if r.exc_info]
    del h.queues[2]
    h.disable()
    assert not h.t.mmio_read(REG_CSTS, 4) & CSTS_CFS
