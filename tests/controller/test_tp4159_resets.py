"""Controller Level Resets and Sanitize around TP4159 (issue 5)."""
from __future__ import annotations

import struct

from emulator.nvme.migration.wire import Seqind
from emulator.nvme.spec import LID, AdminOpcode, CommandSpecific as CS, Generic, IoOpcode
from tp4159_common import (  # noqa: F401
    IO, Lm, generic, invalid_field, lm, specific, stalls, write,
)

SANITIZE_BLOCK_ERASE = 0x2


def reset(h) -> None:  # type: ignore[no-untyped-def]
    """A Controller Level Reset (CC.EN 1 -> 0), then the admin queue again."""
    h.disable()
    h.enable()


def test_mmc_reset_deletes_its_queues_stops_tracking_and_releases_suspend(lm: Lm) -> None:
    g, m = lm.g, lm.m
    q = m.udmq(IO)
    assert m.log_start(q.cdqid).ok
    assert m.track_memory(IO, [(g.mem.iova, g.mem.size >> 12)]).ok
    assert m.suspend(IO).ok
    cid = g.submit(1, IoOpcode.READ, nsid=1, prp1=g.mem.alloc(512), cdw12=0)
    assert stalls(g, 1, cid)
    reset(m.h)
    assert g.wait(1, cid).ok  # "suspended until ... a CLR of the controller processing" it
    specific(m.cdq_get(q.cdqid), CS.INVALID_CONTROLLER_DATA_QUEUE)
    specific(m.track_receive(IO), CS.INVALID_CONTROLLER_IDENTIFIER)
    q2 = m.udmq(IO)  # the target may be logged again
    assert m.log_start(q2.cdqid).ok


def test_mmc_reset_discards_a_set_state_sequence(lm: Lm) -> None:
    m = lm.m
    assert m.suspend(IO).ok
    state = m.get_state(IO)[0]
    assert m.set_state_piece(IO, state[:64], Seqind.FIRST, 0, csvi=0).ok
    reset(m.h)
    generic(m.set_state_piece(IO, state[64:], Seqind.LAST, 64, csvi=0),
            Generic.COMMAND_SEQUENCE_ERROR)


def test_reset_of_the_migratable_controller_clears_suspend(lm: Lm) -> None:
    g, m = lm.g, lm.m
    assert m.suspend(IO).ok
    g.disable()  # CLR of the suspended controller
    specific(m.resume(IO), CS.CONTROLLER_NOT_SUSPENDED)
    g.init(io_queues=1)
    write(g, 0, 1)


def test_sanitize_is_refused_while_a_controller_is_suspended(lm: Lm) -> None:
    g, m = lm.g, lm.m
    write(g, 0, 8, fill=0xEE)
    assert m.suspend(IO).ok
    specific(m.h.admin(AdminOpcode.SANITIZE, cdw10=SANITIZE_BLOCK_ERASE), CS.CONTROLLER_SUSPENDED)
    assert m.resume(IO).ok
    log = m.h.get_log_page(LID.SANITIZE_STATUS, 512).data
    assert struct.unpack_from("<HH", log) == (0xFFFF, 0)  # never sanitized
    assert m.h.admin(AdminOpcode.SANITIZE, cdw10=SANITIZE_BLOCK_ERASE).ok
    assert g.read(1, 0, 8).data == bytes(4096)
    log = g.get_log_page(LID.SANITIZE_STATUS, 512).data  # subsystem wide
    assert struct.unpack_from("<HHI", log) == (0xFFFF, 1 | (1 << 8), SANITIZE_BLOCK_ERASE)  # GDE


def test_sanitize_arguments(lm: Lm) -> None:
    h = lm.g
    for sanact in (0, 4, 5, 7):  # reserved, Crypto Erase, Exit Media Verification, reserved
        invalid_field(h.admin(AdminOpcode.SANITIZE, cdw10=sanact))
    invalid_field(h.admin(AdminOpcode.SANITIZE, cdw10=SANITIZE_BLOCK_ERASE | (1 << 9)))  # NDAS
    assert h.admin(AdminOpcode.SANITIZE, cdw10=0x1).ok  # Exit Failure Mode
    sanicap = struct.unpack_from("<I", h.identify(cns=1), 328)[0]
    assert sanicap & 0x7 == 0x6 and sanicap >> 29 & 1  # BES, OWS, NDI
