"""Track Send SEL 0h, Log User Data Changes: the LBA Migration Queue (issue 5)."""
from __future__ import annotations

from emulator.host.lm import MigrationHost
from emulator.nvme.migration.wire import Esa, Lbacir
from emulator.nvme.spec import AdminOpcode, CommandSpecific as CS, IoOpcode
from tp4159_common import (  # noqa: F401
    IO, Lm, aer_submit, aer_wait, invalid_field, lm, markers, one_shot, ranges, specific, write,
)

TWO_IO: dict = {
    "namespaces": [{"nsid": 1, "size": "16MiB"}],
    "controllers": [{"cntlid": 1, "type": "io", "namespaces": [1]},
                    {"cntlid": 3, "type": "io", "namespaces": [1]},
                    {"cntlid": 2, "type": "mmc"}],
}


def test_write_type_commands_are_logged(lm: Lm) -> None:
    m, g = lm.m, lm.g
    q = m.udmq(IO)
    write(g, 0, 8)
    assert m.drain(q) == []  # not logging yet
    assert m.log_start(q.cdqid).ok
    write(g, 100, 16)
    write(g, 7, 1, qid=2)
    assert g.read(1, 100, 16).ok  # reads change nothing
    assert g.write_zeroes(1, 200, 32).ok
    assert g.write_zeroes(1, 300, 8, deac=True).ok
    assert g.deallocate(1, [(400, 8), (500, 24)]).ok
    assert g.flush(1).ok
    assert m.log_stop(q.cdqid).ok
    write(g, 600, 1)  # after stop: not logged
    got = m.drain(q)
    assert got[0].esa == Esa.FIRST and got[0].lbacir == Lbacir.NO_RANGE
    assert got[-1].esa == Esa.LAST_STOPPED and got[-1].lbacir == Lbacir.NO_RANGE
    assert [(e.nsid, e.slba, e.nlb, e.dlba, e.esa) for e in got[1:-1]] == [
        (1, 100, 16, False, 0), (1, 7, 1, False, 0), (1, 200, 32, False, 0),
        (1, 300, 8, True, 0), (1, 400, 8, True, 0), (1, 500, 24, True, 0)]
    assert all(e.lbacir == Lbacir.RANGE for e in got[1:-1])


def test_phase_tag_wraps(lm: Lm) -> None:
    m, g = lm.m, lm.g
    q = m.udmq(IO, slots=8)
    assert m.log_start(q.cdqid).ok
    seen = []
    for i in range(40):  # five passes over the queue
        write(g, i, 1)
        seen += m.drain(q)
    assert ranges(seen) == [(i, 1) for i in range(40)]
    assert q.phase == 0  # 41 entries in 8 slots: the 6th pass writes CDQP 0


def test_only_the_target_controllers_changes_are_logged(emu) -> None:  # type: ignore[no-untyped-def]
    e = emu(TWO_IO)
    g1, g3, m = e.host(1), e.host(3), MigrationHost(e.host(2))
    q = m.udmq(1)
    assert m.log_start(q.cdqid).ok
    write(g3, 50, 4)  # same namespace, other controller
    write(g1, 60, 4)
    assert ranges(m.drain(q)) == [(60, 4)]


def test_track_send_errors(lm: Lm) -> None:
    m = lm.m
    q = m.udmq(IO, slots=4)
    specific(m.log_start(q.cdqid + 5), CS.INVALID_CONTROLLER_DATA_QUEUE)
    invalid_field(m.h.admin(AdminOpcode.TRACK_SEND, cdw10=(2 << 16), cdw11=q.cdqid))  # LACT 2h
    invalid_field(m.h.admin(AdminOpcode.TRACK_SEND, cdw10=2, cdw11=q.cdqid))  # SEL 2h
    assert m.log_start(q.cdqid).ok
    specific(m.log_start(q.cdqid), CS.INVALID_CONTROLLER_DATA_QUEUE)  # already logging
    write(lm.g, 0, 1)
    write(lm.g, 1, 1)  # the queue (3 entries) is full: logging stopped
    specific(m.log_start(q.cdqid), CS.CONTROLLER_DATA_QUEUE_FULL)
    m.drain(q)  # make room
    assert m.log_start(q.cdqid).ok  # logging again
    assert m.log_stop(q.cdqid).ok and m.log_stop(q.cdqid).ok  # stopping twice is fine
    assert m.suspend(IO).ok
    specific(m.log_start(q.cdqid), CS.CONTROLLER_SUSPENDED)


def test_track_send_discards_a_pending_full_event(lm: Lm) -> None:
    m = lm.m
    q = m.udmq(IO, slots=4)
    assert m.log_start(q.cdqid).ok
    write(lm.g, 0, 1)
    write(lm.g, 1, 1)  # full: event pending, no AER outstanding
    m.drain(q)
    assert m.log_start(q.cdqid).ok
    cid = aer_submit(m.h)
    assert aer_wait(m.h, cid, 0.2) is None


def test_markers_on_suspend_and_resume(lm: Lm) -> None:
    m, g = lm.m, lm.g
    q = m.udmq(IO)
    assert m.log_start(q.cdqid).ok
    write(g, 1, 1)
    assert m.suspend(IO).ok
    cid = g.submit(1, IoOpcode.WRITE, nsid=1, prp1=g.mem.alloc(512), cdw10=5)  # stalls
    assert m.resume(IO).ok
    assert g.wait(1, cid).ok
    write(g, 2, 1)
    got = m.drain(q)
    assert [(e.esa, e.lbacir, e.slba) for e in got] == [
        (Esa.FIRST, 2, 0), (0, 0, 1), (Esa.LAST_SUSPENDED, 2, 0), (Esa.FIRST, 2, 0),
        (0, 0, 5), (0, 0, 2)]


def test_suspend_with_dudmq_deletes_the_queue_after_its_marker(lm: Lm) -> None:
    m = lm.m
    q = m.udmq(IO)
    assert m.log_start(q.cdqid).ok
    assert m.suspend(IO, dudmq=True).ok
    assert markers(m.drain(q, consume=False)) == [Esa.FIRST, Esa.LAST_SUSPENDED]
    specific(m.cdq_get(q.cdqid), CS.INVALID_CONTROLLER_DATA_QUEUE)
    assert m.resume(IO).ok
    assert m.udmq(IO).cdqid == q.cdqid  # a new UDMQ can be created


def test_deleting_the_queue_ends_logging(lm: Lm) -> None:
    m = lm.m
    q = m.udmq(IO)
    assert m.log_start(q.cdqid).ok
    assert m.cdq_delete(q.cdqid).ok
    write(lm.g, 3, 1)
    q2 = m.udmq(IO)
    assert m.drain(q2) == []


def test_whole_namespace_entry_for_sanitize(lm: Lm) -> None:
    m = lm.m
    q = m.udmq(IO)
    assert m.log_start(q.cdqid).ok
    assert lm.g.admin(AdminOpcode.SANITIZE, cdw10=0x2).ok  # Block Erase by the logged controller
    got = m.drain(q)
    # NVM CS 1.2 Figure 177: with ESA 000b LBACIR is 00b, so the whole namespace
    # is an ordinary range entry covering every LBA (16 MiB of 512-byte LBAs).
    assert [(e.nsid, e.esa, e.lbacir, e.dlba, e.slba, e.nlb) for e in got[1:]] == [
        (1, Esa.NORMAL, Lbacir.RANGE, True, 0, 32768)]
    assert m.h.admin(AdminOpcode.SANITIZE, cdw10=0x2).ok  # by the MMC: not the target's change
    assert m.drain(q) == []
