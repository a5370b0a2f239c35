"""Migration Send (Suspend, Resume, Set Controller State) and Migration Receive
(Get Controller State) through the host driver (issue 5)."""
from __future__ import annotations

import json
import struct
import zlib

import pytest

from emulator.host.lm import MigrationHost
from emulator.nvme.migration import ctrlstate, wire
from emulator.nvme.migration.wire import Seqind
from emulator.nvme.spec import REG_CC, FID, AdminOpcode, CommandSpecific as CS, Generic, IoOpcode
from tp4159_common import (  # noqa: F401
    IO, MMC, Lm, aer_submit, aer_wait, flush_posted, generic, invalid_field, lm, specific, stalls,
    write,
)

SPARE = 3  # a second migratable controller nobody enabled
WITH_SPARE: dict = {
    "namespaces": [{"nsid": 1, "size": "16MiB"}],
    "controllers": [{"cntlid": 1, "type": "io", "namespaces": [1], "max_io_queues": 4},
                    {"cntlid": 3, "type": "io", "namespaces": [1], "max_io_queues": 4},
                    {"cntlid": 2, "type": "mmc"}],
}


def parse_state(data: bytes) -> tuple[int, int, bytes, bytes]:
    """(CSATTR, NVMECSS, NVMe part, vendor part)."""
    ver, csattr, css, _, vss, _ = wire.CS_HEADER.unpack_from(data)
    assert ver == 0
    nvme = data[48:48 + 4 * css]
    return csattr, css, nvme, data[48 + 4 * css:48 + 4 * (css + vss)]


def vendor_doc(part: bytes) -> dict:
    magic, fmt, _, length, crc = wire.VENDOR_STATE_HEADER.unpack_from(part)
    body = part[32:32 + length]
    assert (magic, fmt, zlib.crc32(body)) == (wire.VENDOR_STATE_MAGIC, 1, crc)
    return json.loads(body)


# ------------------------------------------------------------------ Suspend / Resume
def test_io_stalls_while_suspended_and_completes_after_resume(lm: Lm) -> None:
    g, m = lm.g, lm.m
    write(g, 0, 1, fill=0x11)
    assert m.suspend(IO).ok
    cid = g.submit(1, IoOpcode.READ, nsid=1, prp1=g.mem.alloc(512), cdw12=0)
    admin_cid = g.submit(0, AdminOpcode.IDENTIFY, prp1=g.mem.alloc(4096), cdw10=1)
    assert stalls(g, 1, cid) and stalls(g, 0, admin_cid, 0.05)  # admin SQ too
    assert m.resume(IO).ok
    assert g.wait(1, cid).ok and g.wait(0, admin_cid).ok


def test_suspend_notification_changes_nothing(lm: Lm) -> None:
    assert lm.m.suspend(IO, stype=wire.STYPE_NOTIFICATION).ok
    write(lm.g, 0, 1)
    specific(lm.m.resume(IO), CS.CONTROLLER_NOT_SUSPENDED)


def test_suspend_twice_is_not_an_error(lm: Lm) -> None:
    assert lm.m.suspend(IO).ok and lm.m.suspend(IO).ok
    assert lm.m.resume(IO).ok
    specific(lm.m.resume(IO), CS.CONTROLLER_NOT_SUSPENDED)


def test_suspend_and_resume_errors(lm: Lm) -> None:
    m = lm.m
    invalid_field(m.suspend(IO, stype=2))  # reserved STYPE
    for cntlid in (MMC, 9):
        specific(m.suspend(cntlid), CS.INVALID_CONTROLLER_IDENTIFIER)
        specific(m.resume(cntlid), CS.INVALID_CONTROLLER_IDENTIFIER)
    invalid_field(m.h.admin(AdminOpcode.MIGRATION_SEND, cdw10=3, cdw11=IO))  # reserved SEL


def test_outstanding_aer_survives_suspend(lm: Lm) -> None:
    g, m = lm.g, lm.m
    cid = aer_submit(g)
    assert m.suspend(IO).ok
    g.t.mmio_write(0x1000 + 2 * 9 * 4, 4, 1)  # doorbell of a missing SQ: an error event
    assert aer_wait(g, cid, 0.2) is None  # no completion while suspended
    assert m.resume(IO).ok
    c = aer_wait(g, cid)
    assert c is not None and c.dw0 & 0x7 == 0  # Error status event


# ------------------------------------------------------------------ Get Controller State
def test_get_controller_state(lm: Lm) -> None:
    g, m = lm.g, lm.m
    for i in range(5):
        write(g, i, 1)  # CQ 1 tail 5
    assert m.suspend(IO).ok
    data, csup = m.get_state(IO)
    assert csup
    csattr, css, nvme, vendor = parse_state(data)
    assert csattr & wire.CSATTR_SUSPENDED and css == (8 + 4 * 24) // 4
    ver, niosq, niocq = wire.NVMECS_HEADER.unpack_from(nvme)
    assert (ver, niosq, niocq) == (0, 2, 2)
    sqs = [wire.IOSQ_STATE.unpack_from(nvme, 8 + 24 * i) for i in range(2)]
    cqs = [wire.IOCQ_STATE.unpack_from(nvme, 56 + 24 * i) for i in range(2)]
    for qid, (prp1, qsize, sqid, cqid, iosqa, hp, tp) in zip((1, 2), sqs):
        hq = g.queues[qid]
        assert (prp1, qsize, sqid, cqid, iosqa & 1) == (hq.sq_iova, hq.size - 1, qid, qid, 1)
        assert hp == tp == hq.sq_tail
    for qid, (prp1, qsize, cqid, hp, tp, iocqa) in zip((1, 2), cqs):
        hq = g.queues[qid]
        assert (prp1, qsize, cqid, hp, tp) == (hq.cq_iova, hq.size - 1, qid, hq.cq_head, hq.cq_head)
        assert iocqa & 0x3 == 0x3 and iocqa >> 16 == qid  # PC, IEN, IV
    assert (cqs[0][5] >> 2) & 1 == 1  # S0PT: slot 0 holds phase 1 (tail 5, first pass)
    assert (cqs[1][5] >> 2) & 1 == 0  # untouched CQ: slot 0 holds 0
    doc = vendor_doc(vendor)
    assert doc["state"]["regs"]["cc"] & 1 and doc["state"]["suspended"]
    assert [q["qid"] for q in doc["state"]["sqs"]] == [0, 1, 2]


def test_get_state_without_suspend_and_formats(lm: Lm) -> None:
    m = lm.m
    c = m.get_state_piece(IO, 0, 1023)
    assert c.ok and not c.dw0 & wire.CSUP
    assert not parse_state(c.data)[0] & wire.CSATTR_SUSPENDED
    _, css, _, vendor = parse_state(m.get_state(IO, csvi=1, csuuidi=0)[0])
    assert css and vendor == b""
    _, css, nvme, vendor = parse_state(m.get_state(IO, csvi=0, csuuidi=1)[0])
    assert css == 0 and nvme == b"" and vendor
    data = m.get_state_piece(IO, 0, 11, csvi=0, csuuidi=0).data
    assert wire.CS_HEADER.unpack_from(data)[2:] == (0, 0, 0, 0)


def test_get_state_in_pieces(lm: Lm) -> None:
    m = lm.m
    assert m.suspend(IO).ok
    whole = m.get_state(IO)[0]
    assert m.get_state(IO, piece=64)[0] == whole
    c = m.get_state_piece(IO, 48, 1)  # NVMe Controller State header only
    assert wire.NVMECS_HEADER.unpack_from(c.data) == (0, 2, 2)
    c = m.get_state_piece(IO, len(whole) - 4, 3)  # past the end: zero filled
    assert c.ok and c.data[4:] == bytes(12)


def test_get_state_errors(lm: Lm) -> None:
    m = lm.m
    invalid_field(m.get_state_piece(IO, 0, 15, csvi=2))
    invalid_field(m.get_state_piece(IO, 0, 15, csuuidi=2))
    invalid_field(m.get_state_piece(IO, 2, 15))  # offset not dword aligned
    invalid_field(m.get_state_piece(IO, 1 << 20, 15))  # beyond the structure
    invalid_field(m.h.admin(AdminOpcode.MIGRATION_RECEIVE, read_len=64, cdw10=1, cdw11=IO,
                            cdw15=15))  # reserved SEL
    specific(m.get_state_piece(MMC, 0, 15), CS.INVALID_CONTROLLER_IDENTIFIER)
    specific(m.get_state_piece(9, 0, 15), CS.INVALID_CONTROLLER_IDENTIFIER)


# ------------------------------------------------------------------ Set Controller State
@pytest.fixture
def spare(emu):  # type: ignore[no-untyped-def]
    e = emu(WITH_SPARE)
    return e, e.host(IO, io_queues=2), MigrationHost(e.host(MMC))


def test_state_round_trip_is_exact(spare) -> None:  # type: ignore[no-untyped-def]
    e, g, m = spare
    g.set_features(FID.INTERRUPT_COALESCING, 0x0203)
    g.set_features(FID.HOST_IDENTIFIER, data=bytes(range(8)))
    g.admin(0x70)  # an error log entry
    aer_cid = aer_submit(g)
    for i in range(7):
        write(g, i * 8, 8, qid=1 + i % 2)
    assert m.suspend(IO).ok
    state = m.get_state(IO)[0]
    specific(m.set_state(SPARE, state), CS.INVALID_CONTROLLER_IDENTIFIER)  # disabled, running
    assert m.suspend(SPARE).ok  # a disabled controller can be suspended
    assert m.set_state(SPARE, state, piece=256).ok
    again = m.get_state(SPARE)[0]
    a, b = parse_state(state), parse_state(again)
    assert a[:3] == b[:3]
    da, db = vendor_doc(a[3]), vendor_doc(b[3])
    for d in (da, db):
        for volatile in ("uptime_ms", "wall_clock"):
            d.pop(volatile)
        d["state"].pop("cntlid")
    assert da == db
    assert da["state"]["aer"]["outstanding"] == [aer_cid]
    # The spare now is the controller: the host keeps its queues and moves over.
    g.t = e.connect(SPARE, memory=g.mem)
    assert m.resume(SPARE).ok
    write(g, 100, 8)
    assert g.read(1, 8, 8).data == bytes([0x5A]) * 4096
    assert struct.unpack_from("<H", g.identify(cns=1), 78)[0] == SPARE


def test_set_state_sequence_errors(spare) -> None:  # type: ignore[no-untyped-def]
    e, g, m = spare
    assert m.suspend(IO).ok
    state = m.get_state(IO)[0]
    assert m.suspend(SPARE).ok
    generic(m.set_state_piece(SPARE, state[:64], Seqind.MIDDLE, 0), Generic.COMMAND_SEQUENCE_ERROR)
    generic(m.set_state_piece(SPARE, state[:64], Seqind.LAST, 0), Generic.COMMAND_SEQUENCE_ERROR)
    assert m.set_state_piece(SPARE, state[:64], Seqind.FIRST, 0).ok
    generic(m.resume(SPARE), Generic.COMMAND_SEQUENCE_ERROR)  # not committed yet
    invalid_field(m.set_state_piece(SPARE, state[128:192], Seqind.MIDDLE, 128))  # a gap
    # the failure discarded the sequence: the host starts over
    generic(m.set_state_piece(SPARE, state[64:], Seqind.LAST, 64), Generic.COMMAND_SEQUENCE_ERROR)
    assert m.set_state_piece(SPARE, state[:64], Seqind.FIRST, 0).ok
    assert m.set_state_piece(SPARE, state[:64], Seqind.FIRST, 0).ok  # 01b restarts
    assert m.set_state_piece(SPARE, state[64:128], Seqind.MIDDLE, 64).ok
    assert m.set_state_piece(SPARE, state[128:], Seqind.MIDDLE, 128).ok
    assert m.set_state_piece(SPARE, b"", Seqind.LAST, len(state)).ok  # NUMD 0 in a last piece
    assert m.resume(SPARE).ok


def test_set_state_field_errors(spare, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    e, g, m = spare
    assert m.suspend(IO).ok
    state = m.get_state(IO)[0]
    nvme_only = m.get_state(IO, csuuidi=0)[0]
    vendor_only = m.get_state(IO, csvi=0)[0]
    # Into the source itself: it still has its I/O queues.
    invalid_field(m.set_state(IO, nvme_only, csuuidi=0))
    assert m.suspend(SPARE).ok
    invalid_field(m.set_state(SPARE, state, csvi=0, csuuidi=0))
    invalid_field(m.set_state(SPARE, state, csvi=2))
    invalid_field(m.set_state(SPARE, state, csuuidi=2))
    invalid_field(m.set_state(SPARE, nvme_only, csvi=0, csuuidi=1))  # NVMECSS != 0, CSVI 0
    invalid_field(m.set_state(SPARE, vendor_only, csvi=1, csuuidi=0))  # VSS != 0, CSUUIDI 0
    invalid_field(m.set_state_piece(SPARE, state, Seqind.ONLY, offset=2))
    invalid_field(m.set_state_piece(SPARE, state, Seqind.ONLY, numd=0))
    invalid_field(m.set_state(SPARE, state[:-4]))  # truncated
    invalid_field(m.set_state(SPARE, state + bytes(4)))  # longer than the header says
    bad = bytearray(state)
    bad[-5] ^= 0xFF  # vendor JSON corrupted: CRC
    invalid_field(m.set_state(SPARE, bytes(bad)))
    bad = bytearray(state)
    bad[0] = 1  # VER
    invalid_field(m.set_state(SPARE, bytes(bad)))
    bad = bytearray(nvme_only)
    struct.pack_into("<H", bad, 48 + 8 + 8, 0)  # SQ 1 size 1 entry
    invalid_field(m.set_state(SPARE, bytes(bad), csuuidi=0))
    bad = bytearray(nvme_only)
    struct.pack_into("<H", bad, 48 + 8 + 24 + 10, 9)  # SQ id beyond max_io_queues
    specific(m.set_state(SPARE, bytes(bad), csuuidi=0), CS.NOT_ENOUGH_RESOURCES)
    monkeypatch.setattr(ctrlstate, "MAX_STATE_BYTES", 64)
    specific(m.set_state(SPARE, state), CS.NOT_ENOUGH_RESOURCES)


def test_set_nvme_defined_state_only(spare) -> None:  # type: ignore[no-untyped-def]
    """CSVI only, into an enabled controller with its own admin queue (libvfn's flow)."""
    e, g, m = spare
    write(g, 0, 8, fill=0x77)
    assert m.suspend(IO).ok
    cid = g.submit(1, IoOpcode.READ, nsid=1, prp1=g.mem.alloc(4096), cdw12=7)  # while suspended
    flush_posted(g)
    state = m.get_state(IO, csuuidi=0)[0]
    h3 = e.host(SPARE, init=False, memory=g.mem)
    h3.enable()  # enabled, admin queue only
    assert m.suspend(SPARE).ok
    assert m.set_state(SPARE, state, csuuidi=0).ok
    assert m.resume(SPARE).ok
    h3.queues[1] = g.queues[1]  # the I/O queue moves to the new controller's host
    c = h3.wait(1, cid)
    assert c.ok
    assert h3.read(1, 0, 8).data == bytes([0x77]) * 4096


def test_set_state_applies_the_create_queue_rules(spare) -> None:  # type: ignore[no-untyped-def]
    """The queues of a Controller State are checked as Create I/O CQ/SQ checks them
    (admin_queues.check_new_queue): against the granted Number of Queues, not only
    max_io_queues, and against CC.IOSQES/IOCQES."""
    e, g, m = spare  # the source has two I/O queue pairs
    assert m.suspend(IO).ok
    state = m.get_state(IO, csuuidi=0)[0]
    h3 = e.host(SPARE, init=False, memory=g.mem)
    h3.enable()
    assert h3.set_features(FID.NUMBER_OF_QUEUES, 0).ok  # one pair granted (max_io_queues is 4)
    assert m.suspend(SPARE).ok
    specific(m.set_state(SPARE, state, csuuidi=0), CS.NOT_ENOUGH_RESOURCES)  # queue 2
    assert m.resume(SPARE).ok
    assert h3.set_features(FID.NUMBER_OF_QUEUES, 1 | (1 << 16)).ok  # two pairs
    cc = h3.t.mmio_read(REG_CC, 4)
    h3.t.mmio_write(REG_CC, 4, cc & ~(0xF << 16))  # CC.IOSQES 0: no I/O SQ may be created
    assert h3.t.mmio_read(REG_CC, 4) == cc & ~(0xF << 16)  # posted: in before the MMC's commands
    assert m.suspend(SPARE).ok
    invalid_field(m.set_state(SPARE, state, csuuidi=0))
    assert m.resume(SPARE).ok
    h3.t.mmio_write(REG_CC, 4, cc)
    assert h3.t.mmio_read(REG_CC, 4) == cc  # posted: in before the MMC's commands
    assert m.suspend(SPARE).ok
    assert m.set_state(SPARE, state, csuuidi=0).ok  # with both rules met the same state fits


def test_resume_signals_completions_the_host_has_not_consumed(spare) -> None:  # type: ignore[no-untyped-def]
    """A CQE posted on the source but not yet consumed gets its interrupt again on the
    destination at Resume (the source's interrupt went to the old transport)."""
    e, g, m = spare
    buf = g.mem.alloc(512)
    cid = g.submit(1, IoOpcode.READ, nsid=1, prp1=buf, cdw12=0)
    assert g.t.wait_irq(1, 2.0)  # completed on the source; the host has not reaped it
    assert m.suspend(IO).ok
    state = m.get_state(IO)[0]
    assert m.suspend(SPARE).ok and m.set_state(SPARE, state).ok
    g.t = e.connect(SPARE, memory=g.mem)
    assert not g.t.wait_irq(1, 0.1)
    assert m.resume(SPARE).ok
    assert g.t.wait_irq(1, 2.0)  # re-signalled by the destination
    assert g.poll(1, cid) is not None
