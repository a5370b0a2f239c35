"""Track Send SEL 1h (Track Memory Changes) and Track Receive (issue 5)."""
from __future__ import annotations

import struct

import pytest

from emulator.nvme.migration import memtrack, wire
from emulator.nvme.spec import AdminOpcode, CommandSpecific as CS, IoOpcode
from tp4159_common import IO, MMC, Lm, invalid_field, lm, specific  # noqa: F401

PAGE = 4096


def whole(lm: Lm, rmrtg: int = 0) -> list[tuple[int, int]]:
    """One descriptor over all of the guest host's memory."""
    return [(lm.g.mem.iova, lm.g.mem.size >> (12 + rmrtg))]


def read_into(lm: Lm, buf: int, nlb: int = 8, slba: int = 0) -> None:
    prp1, prp2, _ = lm.g.build_prps(buf, nlb * 512)
    c = lm.g.command(1, IoOpcode.READ, nsid=1, prp1=prp1, prp2=prp2, cdw10=slba, cdw12=nlb - 1)
    assert c.ok, c


def test_reports_what_the_controller_wrote(lm: Lm) -> None:
    m = lm.m
    buf = lm.g.mem.alloc(PAGE)
    assert m.track_memory(IO, whole(lm)).ok
    read_into(lm, buf)
    c = m.track_receive(IO)
    assert c.ok, c
    attrb, cntlid, rpmpg, got = m.parse_tracked(c.data)
    assert (attrb, cntlid, rpmpg) == (0, IO, 0)
    cq1 = lm.g.queues[1].cq_iova
    assert got == sorted([(buf, PAGE), (cq1, PAGE)])
    attrb, _, _, got = m.parse_tracked(m.track_receive(IO).data)  # read-and-clear
    assert (attrb, got) == (0, [])


def test_granularity_and_coalescing(lm: Lm) -> None:
    m = lm.m
    buf = lm.g.mem.alloc(4 * PAGE)
    assert m.track_memory(IO, whole(lm, rmrtg=4), rmrtg=4).ok  # 64 KiB granules
    read_into(lm, buf, nlb=32)  # 16 KiB of read data
    _, _, rpmpg, got = m.parse_tracked(m.track_receive(IO).data)
    assert rpmpg == 4
    unit = 64 << 10
    expect = {(buf // unit * unit, unit), (lm.g.queues[1].cq_iova // unit * unit, unit)}
    if (buf + 4 * PAGE - 1) // unit != buf // unit:
        expect.add(((buf // unit + 1) * unit, unit))
    merged: set[tuple[int, int]] = set()
    for a, n in got:  # adjacent granules come as one run
        merged.update((a + i, unit) for i in range(0, n, unit))
    assert merged == expect


def test_more_to_report(lm: Lm) -> None:
    m = lm.m
    bufs = [lm.g.mem.alloc(PAGE) for _ in range(3)]
    lm.g.mem.alloc(PAGE)
    assert m.track_memory(IO, whole(lm)).ok
    for b in bufs[::2]:
        read_into(lm, b, nlb=1)
    numdl = (16 + 16) // 4 - 1  # room for one descriptor
    seen = []
    while True:
        c = m.track_receive(IO, numdl=numdl)
        attrb, _, _, got = m.parse_tracked(c.data)
        assert len(got) <= 1
        seen += got
        if not attrb & wire.ATTRB_MTR:
            break
    assert sorted(seen) == sorted([(bufs[0], PAGE), (bufs[2], PAGE),
                                   (lm.g.queues[1].cq_iova, PAGE)])


def test_suspended_attribute(lm: Lm) -> None:
    m = lm.m
    assert m.track_memory(IO, whole(lm)).ok
    assert m.suspend(IO).ok
    ranges, susp = m.dirty_ranges(IO)
    assert susp and ranges == []
    assert m.resume(IO).ok
    assert m.dirty_ranges(IO) == ([], False)


def test_stop(lm: Lm) -> None:
    m = lm.m
    assert m.track_memory(IO, whole(lm)).ok
    assert m.track_memory_stop(IO).ok
    specific(m.track_receive(IO), CS.INVALID_CONTROLLER_IDENTIFIER)
    specific(m.track_memory_stop(IO), CS.INVALID_CONTROLLER_IDENTIFIER)
    read_into(lm, lm.g.mem.alloc(PAGE))
    assert m.track_memory(IO, whole(lm)).ok  # again, nothing stale
    assert m.dirty_ranges(IO) == ([], False)


def test_track_send_tmc_errors(lm: Lm) -> None:
    m = lm.m
    base = lm.g.mem.iova
    specific(m.track_memory(MMC, whole(lm)), CS.INVALID_CONTROLLER_IDENTIFIER)  # itself
    specific(m.track_memory(9, whole(lm)), CS.INVALID_CONTROLLER_IDENTIFIER)  # unknown
    invalid_field(m.track_memory(IO, whole(lm), ver=1))
    invalid_field(m.track_memory(IO, [(base, 1)], rmrtg=memtrack.MAXMRTG + 1))
    invalid_field(m.track_memory(IO, [(base + PAGE, 1)], rmrtg=1))  # SADDR not 8 KiB aligned
    invalid_field(m.track_memory(IO, [(base, 0)]))  # empty descriptor
    invalid_field(m.track_memory(IO, [(base + i * PAGE, 1) for i in range(memtrack.CMMRTD + 1)]))
    invalid_field(m.track_memory(IO, []))
    invalid_field(m.h.admin(AdminOpcode.TRACK_SEND, cdw10=wire.TRACK_SEL_TMC | (0x3 << 16),
                            cdw11=IO))  # MOS reserved bits
    assert m.track_memory(IO, whole(lm)).ok
    specific(m.track_memory(IO, whole(lm)), CS.INVALID_CONTROLLER_IDENTIFIER)  # already tracked


def test_track_send_tmc_on_a_suspended_controller(lm: Lm) -> None:
    assert lm.m.suspend(IO).ok
    specific(lm.m.track_memory(IO, whole(lm)), CS.CONTROLLER_SUSPENDED)


def test_not_enough_resources_reports_what_would_fit(lm: Lm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memtrack, "MAX_GRANULES", 100)
    base = lm.g.mem.iova
    c = lm.m.track_memory(IO, [(base, 60), (base + (1 << 20), 60)])
    specific(c, CS.NOT_ENOUGH_RESOURCES)
    assert (c.dw0, c.dw1) == (1, 1)  # 8 KiB granules would do; 1 descriptor fits at 4 KiB


def test_track_receive_errors(lm: Lm) -> None:
    m = lm.m
    specific(m.track_receive(IO), CS.INVALID_CONTROLLER_IDENTIFIER)  # not tracked
    specific(m.track_receive(MMC), CS.INVALID_CONTROLLER_IDENTIFIER)
    assert m.track_memory(IO, whole(lm)).ok
    invalid_field(m.h.admin(AdminOpcode.TRACK_RECEIVE, read_len=64, cdw10=1, cdw11=IO, cdw12=15))
    c = m.track_receive(IO, numdl=1)  # shorter than the header: truncated, nothing cleared
    assert c.ok and len(c.data) == 8
    assert struct.unpack_from("<BBH", c.data)[2] == IO
