"""Regressions of the TP4159 review (issue 8): each test failed before its fix."""
from __future__ import annotations

import copy
import json
import struct
import time
from typing import Any

import pytest

from emulator.host.driver import CommandTimeout, NvmeHost
from emulator.host.lm import MigrationHost
from emulator.nvme.migration import wire
from emulator.nvme.spec import (
    CC_EN, DOORBELL_BASE, FID, LID, REG_ACQ, REG_AQA, REG_ASQ, REG_CC, AdminOpcode,
    CommandSpecific as CS, Generic,
)
from test_dbbuf import ShadowHost
from test_tp4159_migration import parse_state, vendor_doc
from tp4159_common import (  # noqa: F401
    IO, LM_CONFIG, MMC, Lm, aer_submit, flush_posted, generic, hand_over, invalid_field, lm,
    one_shot, specific, write,
)

PAGE = 4096


def _with(**io: Any) -> dict[str, Any]:
    """LM_CONFIG with extra keys on the migratable controller."""
    cfg = copy.deepcopy(LM_CONFIG)
    cfg["controllers"][0].update(io)
    return cfg


def _get_features(h: NvmeHost, qid: int = 0) -> int:
    return h.submit(qid, AdminOpcode.GET_FEATURES, cdw10=FID.ARBITRATION, ring=False)


def _reap(s: ShadowHost, want: set[int], timeout: float = 5.0) -> None:
    """Reap the shadow host's I/O CQ until every CID of ``want`` completed."""
    deadline = time.monotonic() + timeout
    while want and time.monotonic() < deadline:
        want -= set(s.reap())
    assert not want, f"no completion for {want}"


# ------------------------------------------------------------------ 1. held completions
@pytest.mark.parametrize("marker", ["track_send", "suspend"])
def test_a_full_admin_cq_holds_the_completion_until_the_host_frees_a_slot(
        emu: Any, marker: str) -> None:
    """A Track Send (start) or Suspend marker fills the LMQ; its One-Shot event
    completes an AER into the last free slot of a 4-entry admin CQ (SQ of 32):
    the command's own completion must come once the host frees a slot, not be
    dropped."""
    e = emu(LM_CONFIG)
    e.host(IO)
    h = NvmeHost(e.connect(MMC))
    e.hosts.append(h)
    h.enable(admin_qsize=32, admin_cqsize=4)
    m = MigrationHost(h)
    if marker == "track_send":
        q = m.udmq(IO, slots=2)  # one usable slot: the start marker fills it
        cdw10, cdw11 = wire.TRACK_SEL_LUDC | (wire.LACT_START << 16), q.cdqid
        opcode = AdminOpcode.TRACK_SEND
    else:
        q = m.udmq(IO, slots=3)  # the start marker, then the suspend marker fills it
        assert m.log_start(q.cdqid).ok
        cdw10, cdw11 = wire.MIGRATION_SEND_SUSPEND, IO | (wire.STYPE_SUSPEND << 16)
        opcode = AdminOpcode.MIGRATION_SEND
    aer = aer_submit(h)
    a, b = _get_features(h), _get_features(h)
    t = h.submit(0, opcode, cdw10=cdw10, cdw11=cdw11, ring=False)
    h.ring_sq(0)
    c = h.wait(0, t, timeout=5)  # reaps a, b, the AER; the CQ head doorbell lets it out
    assert c.ok, c
    assert h.wait(0, a).ok and h.wait(0, b).ok
    assert one_shot(h.wait(0, aer)) == (wire.AEI_CDQ_FULL, q.cdqid)
    assert [x.esa for x in m.drain(q, consume=False)][-1] == wire.Esa.LAST_FULL
    # The queue goes on: later commands complete in order.
    assert h.admin(AdminOpcode.GET_FEATURES, cdw10=FID.ARBITRATION).ok


def test_held_completion_of_a_suspended_controller_rides_in_its_state(emu: Any) -> None:
    """On the migratable controller: Get Log Page (RAE=0) re-arms a masked error
    event whose AER takes the last admin CQ slot; its own completion is held.
    Suspend and Get State keep it (vendor state), nothing is written while
    suspended, and after Resume the host receives it."""
    e = emu(LM_CONFIG)
    m = MigrationHost(e.host(MMC))
    g = NvmeHost(e.connect(IO))
    e.hosts.append(g)
    g.enable(admin_qsize=32, admin_cqsize=4)
    aers = [aer_submit(g), aer_submit(g)]
    g.t.mmio_write(DOORBELL_BASE + 2 * 9 * 4, 4, 0)  # doorbell of a missing SQ: error event
    assert g.wait(0, aers[0]).dw0 & 0x7 == 0
    g.t.mmio_write(DOORBELL_BASE + 2 * 9 * 4, 4, 0)  # a second one: masked, pending
    flush_posted(g)
    a, b = _get_features(g), _get_features(g)
    log = g.mem.alloc(PAGE)
    glp = g.submit(0, AdminOpcode.GET_LOG_PAGE, prp1=log, nsid=0xFFFFFFFF,
                   cdw10=LID.ERROR_INFORMATION | ((PAGE // 4 - 1) << 16), ring=False)
    g.ring_sq(0)
    flush_posted(g)
    assert m.suspend(IO).ok
    state, csup = m.get_state(IO)
    admin_cq = next(q for q in vendor_doc(parse_state(state)[3])["state"]["cqs"] if q["qid"] == 0)
    assert [entry[4] for entry in admin_cq["held"]] == [glp]
    before = g.mem.read(g.queues[0].cq_iova, 4 * 16)
    assert len(g.reap(0)) == 3  # a, b and the AER; the CQ head doorbell frees slots...
    flush_posted(g)
    assert g.mem.read(g.queues[0].cq_iova, 4 * 16) == before  # ...but a suspended one posts nothing
    assert m.resume(IO).ok
    assert g.wait(0, glp, timeout=5).ok
    assert g.queues[0].done.pop(a).ok and g.queues[0].done.pop(b).ok
    assert g.queues[0].done.pop(aers[1]).dw0 & 0x7 == 0


def test_held_completion_is_posted_by_the_destination(emu: Any) -> None:
    """The same held completion, migrated with the vendor state: the destination
    posts it once the guest frees a slot there."""
    src, dst = emu(LM_CONFIG), emu(LM_CONFIG)
    g = NvmeHost(src.connect(IO))
    src.hosts.append(g)
    g.enable(admin_qsize=32, admin_cqsize=4)
    aers = [aer_submit(g), aer_submit(g)]
    g.t.mmio_write(DOORBELL_BASE + 2 * 9 * 4, 4, 0)
    assert g.wait(0, aers[0]).dw0 & 0x7 == 0
    g.t.mmio_write(DOORBELL_BASE + 2 * 9 * 4, 4, 0)
    a, b = _get_features(g), _get_features(g)
    glp = g.submit(0, AdminOpcode.GET_LOG_PAGE, prp1=g.mem.alloc(PAGE), nsid=0xFFFFFFFF,
                   cdw10=LID.ERROR_INFORMATION | ((PAGE // 4 - 1) << 16), ring=False)
    g.ring_sq(0)
    flush_posted(g)
    mmhs, mmhd = MigrationHost(src.host(MMC)), MigrationHost(dst.host(MMC))
    assert mmhs.suspend(IO).ok
    source_transport = hand_over(mmhs, mmhd, g, dst)
    assert g.wait(0, glp, timeout=5).ok  # reaps a, b, the AER; the doorbell goes to the destination
    assert g.queues[0].done.pop(a).ok and g.queues[0].done.pop(b).ok
    assert g.queues[0].done.pop(aers[1]).dw0 & 0x7 == 0
    source_transport.close()


# ------------------------------------------------------------------ 2. shadow doorbells
def _shadow_guest(e: Any) -> ShadowHost:
    g = e.host(IO, qsize=16)
    db, ei = g.mem.alloc(PAGE), g.mem.alloc(PAGE)
    assert g.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=db, prp2=ei).ok
    return ShadowHost(g, db, ei)


def test_state_takes_shadow_heads_and_both_parts_agree(emu: Any) -> None:
    e = emu(_with(doorbell_buffer=True))
    s = _shadow_guest(e)
    m = MigrationHost(e.host(MMC))
    for cid in range(5):
        s.put(cid)
    _reap(s, set(range(5)))  # the CQ head goes to the shadow buffer only (EventIdx "never")
    assert m.suspend(IO).ok
    state, _ = m.get_state(IO)
    _, _, nvme, vendor = parse_state(state)
    _, _, cqid, iocqhp, iocqtp, _ = wire.IOCQ_STATE.unpack_from(nvme, 8 + 24)
    assert (cqid, iocqhp, iocqtp) == (1, 5, 5)
    cq1 = next(q for q in vendor_doc(vendor)["state"]["cqs"] if q["qid"] == 1)
    assert (cq1["head"], cq1["tail"]) == (5, 5)


def test_a_suspended_controller_writes_no_eventidx(emu: Any) -> None:
    e = emu(_with(doorbell_buffer=True, sq_poll_idle_us=0))  # not polled: EventIdx = processed tail
    s = _shadow_guest(e)
    m = MigrationHost(e.host(MMC))
    g = s.h
    assert m.track_memory(IO, [(g.mem.iova, g.mem.size >> 12)]).ok
    s.put(0)
    _reap(s, {0})
    assert m.suspend(IO).ok
    assert m.dirty_ranges(IO)[1]  # everything reported, SUSP=1
    s.put(1)  # rings the SQ doorbell
    flush_posted(g)
    assert m.dirty_ranges(IO) == ([], True)
    assert struct.unpack_from("<I", g.mem.read(s.ei + 8, 4))[0] == 1  # EventIdx not re-armed
    assert m.resume(IO).ok
    _reap(s, {1})
    assert struct.unpack_from("<I", g.mem.read(s.ei + 8, 4))[0] == 2  # armed again


def test_migratable_controllers_of_a_subsystem_with_an_mmc_lack_doorbell_buffer(lm: Lm) -> None:
    oacs = struct.unpack_from("<H", lm.g.identify(cns=1), 256)[0]
    assert not oacs & 0x100
    page = lm.g.mem.alloc(2 * PAGE)
    generic(lm.g.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=page, prp2=page + PAGE),
            Generic.INVALID_OPCODE)
    mmc_oacs = struct.unpack_from("<H", lm.m.h.identify(cns=1), 256)[0]
    assert mmc_oacs & 0x100 and mmc_oacs & wire.OACS_HMLMS


class Guest:
    """A guest driver that, like Linux, uses shadow doorbells when OACS offers them."""

    def __init__(self, h: NvmeHost) -> None:
        self.h, self.cid, self.shadow = h, 0, None
        if struct.unpack_from("<H", h.identify(cns=1), 256)[0] & 0x100:
            db, ei = h.mem.alloc(PAGE), h.mem.alloc(PAGE)
            assert h.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=db, prp2=ei).ok
            self.shadow = ShadowHost(h, db, ei)

    def read(self) -> bool:
        """One read on I/O queue 1; False if it gets no completion."""
        if self.shadow is None:
            try:
                return self.h.read(1, 0, 1, timeout=3).ok
            except CommandTimeout:
                return False
        self.cid += 1
        self.shadow.put(self.cid)
        try:
            _reap(self.shadow, {self.cid}, timeout=3)
        except AssertionError:
            return False
        return True


def test_standard_state_only_migration_keeps_the_guest_going(emu: Any) -> None:
    """CSVI=1, CSUUIDI=0 (libvfn's MMH, Samsung's QEMU): the default rule keeps
    shadow doorbells off on the migratable controller, so the guest, which
    would use them if offered, does not stall on the destination."""
    src, dst = emu(LM_CONFIG), emu(LM_CONFIG)
    h = src.host(IO, qsize=16)
    g = Guest(h)
    assert all(g.read() for _ in range(5))
    mmhs, mmhd = MigrationHost(src.host(MMC)), MigrationHost(dst.host(MMC))
    assert mmhs.suspend(IO).ok
    state, _ = mmhs.get_state(IO, csuuidi=0)
    # The destination's controller gets the guest's registers (as a hypervisor
    # would restore them), then the standard state, then Resume.
    source_transport = h.t
    h.t = dst.connect(IO, memory=h.mem)
    admin = h.queues[0]
    h.t.mmio_write(REG_AQA, 4, ((admin.size - 1) << 16) | (admin.size - 1))
    h.t.mmio_write(REG_ASQ, 8, admin.sq_iova)
    h.t.mmio_write(REG_ACQ, 8, admin.cq_iova)
    h.t.mmio_write(REG_CC, 4, CC_EN | (6 << 16) | (4 << 20))
    assert mmhd.suspend(IO).ok
    assert mmhd.set_state(IO, state, csuuidi=0).ok
    assert mmhd.resume(IO).ok
    for i in range(40):  # well past the ~10 I/Os after which shadow doorbells stalled
        assert g.read(), f"I/O {i} after the migration stalled"
    source_transport.close()


# ------------------------------------------------------------------ 3. stop logging while suspended
def test_stop_logging_of_a_suspended_controller_is_controller_suspended(lm: Lm) -> None:
    m = lm.m
    q = m.udmq(IO)
    assert m.log_start(q.cdqid).ok
    assert m.suspend(IO).ok
    specific(m.log_stop(q.cdqid), CS.CONTROLLER_SUSPENDED)
    assert m.cdq_delete(q.cdqid).ok  # the MMH's way to end logging while suspended
    assert m.resume(IO).ok


# ------------------------------------------------------------------ 4. Track Memory Changes
def test_track_memory_outside_host_memory_is_invalid_field(lm: Lm) -> None:
    m = lm.m
    invalid_field(m.track_memory(IO, [(0x7000_0000_0000, 1)]))
    base, pages = lm.g.mem.iova, lm.g.mem.size >> 12
    invalid_field(m.track_memory(IO, [(base, pages + 1)]))  # runs past the end
    assert m.track_memory(IO, [(base, pages)]).ok


# ------------------------------------------------------------------ 5. Track Receive
def test_track_receive_header_only_reports_no_more(lm: Lm) -> None:
    m = lm.m
    assert m.track_memory(IO, [(lm.g.mem.iova, lm.g.mem.size >> 12)]).ok
    write(lm.g, 0, 1)  # the CQE dirties a page
    c = m.track_receive(IO, numdl=wire.TRACKED_HEADER.size // 4 - 1)
    assert c.ok, c
    attrb, _, _, got = m.parse_tracked(c.data)
    assert (got, attrb & wire.ATTRB_MTR) == ([], 0)
    assert m.dirty_ranges(IO)[0]  # nothing was cleared


# ------------------------------------------------------------------ 6. DUDMQ
TWO_MMCS: dict[str, Any] = {
    "namespaces": [{"nsid": 1, "size": "16MiB"}],
    "controllers": [{"cntlid": 1, "type": "io", "namespaces": [1]},
                    {"cntlid": 2, "type": "mmc"}, {"cntlid": 3, "type": "mmc"}],
}


def test_suspend_with_dudmq_deletes_a_udmq_another_mmc_created(emu: Any) -> None:
    e = emu(TWO_MMCS)
    e.host(IO)
    creator, suspender = MigrationHost(e.host(3)), MigrationHost(e.host(MMC))
    q = creator.udmq(IO)
    assert creator.log_start(q.cdqid).ok
    assert suspender.suspend(IO, dudmq=True).ok
    assert [x.esa for x in creator.drain(q, consume=False)] == [wire.Esa.FIRST,
                                                                wire.Esa.LAST_SUSPENDED]
    specific(creator.cdq_get(q.cdqid), CS.INVALID_CONTROLLER_DATA_QUEUE)
    assert suspender.resume(IO).ok
    assert suspender.udmq(IO).cdqid  # the controller has no UDMQ any more


# ------------------------------------------------------------------ 8. log page 12h
def _fid_log(h: NvmeHost) -> list[int]:
    c = h.get_log_page(LID.FEATURE_IDENTIFIERS_SUPPORTED_EFFECTS, 1024)
    assert c.ok, c
    return list(struct.unpack("<256I", c.data))


def test_feature_identifiers_supported_and_effects(lm: Lm) -> None:
    mmc, io = _fid_log(lm.m.h), _fid_log(lm.g)
    assert mmc[FID.CONTROLLER_DATA_QUEUE] == 0x1 | (1 << 26)  # FSUPP, CDQSCP
    assert io[FID.CONTROLLER_DATA_QUEUE] == 0  # Feature 21h is MMC-only
    for fid in (FID.ARBITRATION, FID.NUMBER_OF_QUEUES, FID.TIMESTAMP, FID.HOST_IDENTIFIER):
        assert io[fid] == 0x1 | (1 << 21), fid  # FSUPP, controller scope
    assert io[FID.ERROR_RECOVERY] == 0x1 | (1 << 20)  # namespace scope
    for fid, entry in enumerate(io):  # every listed feature answers Get Features
        if entry & 1:
            assert lm.g.get_features(fid, read_len=512).ok, hex(fid)
    supported = struct.unpack("<256I", lm.g.get_log_page(LID.SUPPORTED_LOG_PAGES, 1024).data)
    assert supported[LID.FEATURE_IDENTIFIERS_SUPPORTED_EFFECTS] & 1


# ------------------------------------------------------------------ 9. Get has no side effect
def test_get_state_changes_nothing_and_is_built_once(emu: Any) -> None:
    e = emu(_with(doorbell_buffer=True))
    s = _shadow_guest(e)
    m = MigrationHost(e.host(MMC))
    ctrl = e.subsystem.controllers[IO]
    s.put(0)
    _reap(s, {0})
    assert m.suspend(IO).ok
    s.put(1, ring=False)
    s.shadow_only()  # a submission published in the shadow buffer only
    flush_posted(s.h)

    def live() -> Any:
        return (json.dumps(ctrl.state.to_dict(), sort_keys=True),
                [(q.qid, q.head, q.tail) for q in ctrl.sqs.values()],
                [(q.qid, q.head, q.tail, q.phase) for q in ctrl.cqs.values()])

    before = e.call(live)
    calls: list[int] = []
    real = ctrl.snapshot

    def counting() -> Any:
        calls.append(1)
        return real()
    ctrl.snapshot = counting
    state, csup = m.get_state(IO, piece=64)
    again, _ = m.get_state(IO, piece=4096)
    assert csup and state == again
    assert e.call(live) == before
    assert len(calls) == 1  # once per suspended sequence, not once per piece
    _, _, nvme, _ = parse_state(state)
    assert wire.IOSQ_STATE.unpack_from(nvme, 8)[5:] == (1, 2)  # IOSQHP 1, IOSQTP 2 (shadow)
    assert m.resume(IO).ok
    _reap(s, {1})  # Resume picks the shadow tail up
