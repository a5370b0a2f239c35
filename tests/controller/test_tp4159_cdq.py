"""Controller Data Queue (45h) and Feature 21h through the host driver (issue 5)."""
from __future__ import annotations

import struct

import pytest

from emulator.host.driver import Completion
from emulator.host.lm import MigrationHost
from emulator.nvme.migration import cdq as cdq_mod, wire
from emulator.nvme.spec import AdminOpcode, CommandSpecific as CS, FID, Generic
from tp4159_common import (  # noqa: F401
    IO, MMC, Lm, aer_submit, aer_wait, generic, invalid_field, lm, one_shot, specific, write,
)

MANY: dict = {
    "namespaces": [{"nsid": 1, "size": "16MiB"}],
    "controllers": [*({"cntlid": i, "type": "io", "namespaces": [1]} for i in range(1, 6)),
                    {"cntlid": 8, "type": "mmc"}, {"cntlid": 9, "type": "mmc"}],
}


def test_create_and_delete(lm: Lm) -> None:
    c, q = lm.m.cdq_create(IO, slots=16)
    assert c.ok and q.cdqid != 0
    assert lm.m.cdq_get(q.cdqid).ok
    assert lm.m.cdq_delete(q.cdqid).ok
    specific(lm.m.cdq_delete(q.cdqid), CS.INVALID_CONTROLLER_DATA_QUEUE)
    c2, q2 = lm.m.cdq_create(IO, slots=16)  # a deleted CDQID may be reused
    assert c2.ok and q2.cdqid == q.cdqid


def test_create_errors(lm: Lm) -> None:
    m = lm.m
    invalid_field(m.cdq_create(IO, 16, qt=1)[0])  # reserved Queue Type
    invalid_field(m.cdq_create(IO, 16, qt=0xC0)[0])  # vendor Queue Type we lack
    specific(m.cdq_create(7, 16)[0], CS.INVALID_CONTROLLER_IDENTIFIER)  # unknown CNTLID
    specific(m.cdq_create(MMC, 16)[0], CS.INVALID_CONTROLLER_IDENTIFIER)  # the MMC itself
    invalid_field(m.cdq_create(IO, 16, size_dw=8 * 16 + 4)[0])  # not a multiple of 8 dwords
    invalid_field(m.cdq_create(IO, 16, size_dw=0)[0])
    invalid_field(m.cdq_create(IO, 16, size_dw=8)[0])  # one slot can never hold an entry
    base = m.h.mem.alloc(8192)
    generic(m.cdq_create(IO, 16, prp1=base + 512)[0], Generic.PRP_OFFSET_INVALID)
    invalid_field(m.cdq_create(IO, 16, prp1=0xDEAD0000)[0])  # not host memory
    assert m.cdq_create(IO, 16)[0].ok
    invalid_field(m.cdq_create(IO, 16)[0])  # that controller already has a UDMQ
    c = m.h.admin(AdminOpcode.CONTROLLER_DATA_QUEUE, cdw10=0x2)
    invalid_field(c)  # reserved SEL


def test_physically_non_contiguous_queue(lm: Lm) -> None:
    m = lm.m
    pages = [m.h.mem.alloc(4096) for _ in range(4)]
    pages = pages[::-1]  # not contiguous in this order
    plist = m.h.mem.alloc(4096)
    m.h.mem.write(plist, struct.pack("<4Q", *pages))
    c = m.h.admin(AdminOpcode.CONTROLLER_DATA_QUEUE, prp1=plist, cdw10=0,
                  cdw11=IO << 16, cdw12=4 * 4096 // 4)
    assert c.ok, c
    cdqid = c.dw0 & 0xFFFF
    assert m.log_start(cdqid).ok
    for i in range(200):  # 128 slots per page: entries cross into the second page
        write(lm.g, i, 1)
    entries = []
    for page in pages:
        for s in range(128):
            raw = m.h.mem.read(page + s * 32, 32)
            nsid, nlb0, slba, attrs = wire.LMQ_ENTRY.unpack(raw)
            if attrs & 1:
                entries.append(slba if attrs >> 6 == 0 else None)
    assert entries == [None, *range(200)]
    # A PRP list entry with an offset, and more PRPs than MCDQPC.
    m.h.mem.write(plist, struct.pack("<Q", pages[0] + 8))
    assert m.cdq_delete(cdqid).ok
    generic(m.h.admin(AdminOpcode.CONTROLLER_DATA_QUEUE, prp1=plist, cdw11=IO << 16,
                      cdw12=4 * 4096 // 4), Generic.PRP_OFFSET_INVALID)
    invalid_field(m.h.admin(AdminOpcode.CONTROLLER_DATA_QUEUE, prp1=plist, cdw11=IO << 16,
                            cdw12=(cdq_mod.MCDQPC + 1) * 4096 // 4))


def test_memory_range_limits(emu) -> None:  # type: ignore[no-untyped-def]
    e = emu(MANY)
    a, b = MigrationHost(e.host(8)), MigrationHost(e.host(9))

    def scattered(m: MigrationHost, cntlid: int, n: int) -> Completion:
        pages = [m.h.mem.alloc(4096) for _ in range(2 * n)][::2]  # every other page
        plist = m.h.mem.alloc(n * 8)
        m.h.mem.write(plist, struct.pack(f"<{n}Q", *pages))
        return m.h.admin(AdminOpcode.CONTROLLER_DATA_QUEUE, prp1=plist, cdw11=cntlid << 16,
                         cdw12=n * 4096 // 4)

    invalid_field(scattered(a, 1, cdq_mod.MCMR + 1))  # MCMR
    for cntlid in range(1, 5):
        assert scattered(a, cntlid, cdq_mod.MCMR).ok  # 4 x 64 = NMCMR
    invalid_field(scattered(b, 5, 1))  # NMCMR: one range more in the subsystem
    # MCUDMQ (4 per MMC): the UDMQ subsection's Not Enough Resources.
    specific(a.cdq_create(5, 16)[0], CS.NOT_ENOUGH_RESOURCES)


def test_subsystem_udmq_limit(emu, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cdq_mod, "MNSUDMQ", 2)
    e = emu(MANY)
    a, b = MigrationHost(e.host(8)), MigrationHost(e.host(9))
    assert a.cdq_create(1, 16)[0].ok and b.cdq_create(2, 16)[0].ok
    specific(b.cdq_create(3, 16)[0], CS.NOT_ENOUGH_RESOURCES)


def test_vendor_specific_create_at_an_address(lm: Lm) -> None:
    m = lm.m
    base = m.h.mem.alloc(16 * 32)
    c = m.h.admin(AdminOpcode.CONTROLLER_DATA_QUEUE, cdw10=wire.CdqSel.VS_CREATE_AT,
                  cdw11=(IO << 16) | 1, cdw12=16 * 8, cdw13=base & 0xFFFFFFFF, cdw14=base >> 32)
    assert c.ok, c
    assert m.log_start(c.dw0 & 0xFFFF).ok
    write(lm.g, 100, 3)
    nsid, nlb0, slba, attrs = wire.LMQ_ENTRY.unpack(m.h.mem.read(base + 32, 32))
    assert (nsid, nlb0, slba, attrs & 1) == (1, 2, 100, 1)
    invalid_field(m.h.admin(AdminOpcode.CONTROLLER_DATA_QUEUE, cdw10=wire.CdqSel.VS_CREATE_AT,
                            cdw11=IO << 16, cdw12=16 * 8, cdw13=base & 0xFFFFFFFF))  # PC=0


def test_feature_get_and_set(lm: Lm) -> None:
    m = lm.m
    q = m.udmq(IO, slots=8)
    c = m.cdq_get(q.cdqid)
    assert c.ok and c.dw0 == q.cdqid  # ETPT 0
    assert struct.unpack_from("<II", c.data) == (0, 0) and c.data[8:] == bytes(504)
    assert m.cdq_set(q.cdqid, hp=0, tpt=5).ok
    c = m.cdq_get(q.cdqid)
    assert c.dw0 == wire.CDQ_FEATURE_ETPT | q.cdqid
    assert struct.unpack_from("<II", c.data) == (0, 5)
    assert m.log_start(q.cdqid).ok  # entry 0: the start marker
    write(lm.g, 0, 1)
    write(lm.g, 1, 1)
    got = m.drain(q)  # consumes: HP = tail = 3
    assert [e.slba for e in got] == [0, 0, 1] and q.head == 3
    assert struct.unpack_from("<II", m.cdq_get(q.cdqid).data)[0] == 3


def test_feature_errors(lm: Lm) -> None:
    m = lm.m
    q = m.udmq(IO, slots=8)
    specific(m.cdq_get(q.cdqid + 1), CS.INVALID_CONTROLLER_DATA_QUEUE)
    specific(m.cdq_set(q.cdqid + 1, 0), CS.INVALID_CONTROLLER_DATA_QUEUE)
    invalid_field(m.cdq_set(q.cdqid, hp=1))  # empty queue: HP must stay
    invalid_field(m.cdq_set(q.cdqid, hp=0, tpt=8))  # TPT is not a slot
    assert m.log_start(q.cdqid).ok
    write(lm.g, 0, 1)  # slots 0 (marker) and 1 posted, tail 2
    invalid_field(m.cdq_set(q.cdqid, hp=3))  # beyond the tail
    invalid_field(m.cdq_set(q.cdqid, hp=9))  # not a slot
    assert m.cdq_set(q.cdqid, hp=1).ok and m.cdq_set(q.cdqid, hp=2).ok
    c = m.h.admin(AdminOpcode.SET_FEATURES, cdw10=FID.CONTROLLER_DATA_QUEUE | (1 << 31),
                  cdw11=q.cdqid, cdw12=2)
    specific(c, CS.FEATURE_NOT_SAVEABLE)


def test_tail_pointer_event_is_one_shot(lm: Lm) -> None:
    m = lm.m
    q = m.udmq(IO, slots=16)
    assert m.cdq_set(q.cdqid, hp=0, tpt=2).ok
    cid = aer_submit(m.h)
    assert m.log_start(q.cdqid).ok  # slot 0
    write(lm.g, 10, 1)  # slot 1
    assert aer_wait(m.h, cid, 0.2) is None  # TPT is slot 2, not "tail reached 2"
    write(lm.g, 11, 1)  # slot 2 posted: the event
    c = aer_wait(m.h, cid)
    assert c is not None and one_shot(c) == (wire.AEI_CDQ_TAIL_POINTER, q.cdqid)
    assert not m.cdq_get(q.cdqid).dw0 & wire.CDQ_FEATURE_ETPT  # ETPT cleared
    cid = aer_submit(m.h)
    write(lm.g, 12, 1)
    assert aer_wait(m.h, cid, 0.2) is None  # one event per arming


def test_set_features_discards_a_pending_tail_pointer_event(lm: Lm) -> None:
    m = lm.m
    q = m.udmq(IO, slots=16)
    assert m.cdq_set(q.cdqid, hp=0, tpt=1).ok
    assert m.log_start(q.cdqid).ok
    write(lm.g, 0, 1)  # slot 1: event pending (no AER outstanding)
    assert m.cdq_set(q.cdqid, hp=0).ok
    cid = aer_submit(m.h)
    assert aer_wait(m.h, cid, 0.2) is None


def test_full_queue_event_and_last_entry(lm: Lm) -> None:
    m = lm.m
    q = m.udmq(IO, slots=4)  # holds 3 entries
    cid = aer_submit(m.h)
    assert m.log_start(q.cdqid).ok  # marker
    write(lm.g, 0, 1)
    write(lm.g, 1, 1)  # fills the queue: ESA 111b, logging stops
    write(lm.g, 2, 1)  # not logged
    c = aer_wait(m.h, cid)
    assert c is not None and one_shot(c) == (wire.AEI_CDQ_FULL, q.cdqid)
    got = m.drain(q)
    assert [(e.esa, e.slba) for e in got] == [(wire.Esa.FIRST, 0), (wire.Esa.NORMAL, 0),
                                             (wire.Esa.LAST_FULL, 1)]
