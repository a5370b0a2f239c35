"""Sanitize Overwrite passes, progress in the Sanitize Status log (81h) and Global Data
Erased, through the host driver (Base 2.1 §5.1.22, §8.1.24; log 81h Figure 291)."""
from __future__ import annotations

import struct
import threading

import pytest

from emulator.nvme import sanitize as san
from emulator.nvme.spec import LID, Generic

CFG = {
    "namespaces": [{"nsid": 1, "size": "2MiB"}, {"nsid": 2, "size": "1MiB", "lba_size": 4096},
                   {"nsid": 3, "size": "1MiB"}],
    "controllers": [{"cntlid": 1, "type": "io", "namespaces": [1, 2]},
                    {"cntlid": 2, "type": "io", "namespaces": [3]}],
}
PATTERN = 0x12345678
INVERTED = PATTERN ^ 0xFFFFFFFF
SANITIZE, OVERWRITE, BLOCK_ERASE, OIPBP = 0x84, 0x3, 0x2, 1 << 8
STEP = 60.0  # generous: the machine may be loaded; never a timing assertion


def status(h) -> tuple[int, int, int, int, bool]:
    """SPROG, SOS, OPC, SCDW10, GDE of the Sanitize Status log."""
    sprog, sstat, scdw10 = struct.unpack_from("<HHI", h.get_log_page(LID.SANITIZE_STATUS, 512).data)
    return sprog, sstat & 0x7, (sstat >> 3) & 0x1F, scdw10, bool(sstat & (1 << 8))


@pytest.mark.parametrize("oipbp,passes,want", [
    (False, 3, [PATTERN] * 3),
    (True, 1, [PATTERN]),
    (True, 2, [INVERTED, PATTERN]),  # an even count starts inverted ...
    (True, 3, [PATTERN, INVERTED, PATTERN]),  # ... so the last pass is always OVRPAT
])
def test_pass_patterns(oipbp, passes, want):
    assert san.pass_patterns(PATTERN, passes, oipbp) == want


def test_every_pass_is_written_and_progress_advances(emu, monkeypatch):
    """Three OIPBP passes: each writes every namespace with its own pattern, and between
    passes the log reports Sanitizing with OPC and SPROG advancing; another Sanitize is
    refused meanwhile.  The worker waits at the start of each pass until the test has looked."""
    e = emu(CFG)
    h = e.host()
    written: list[tuple[int, int]] = []
    at_pass, go = threading.Semaphore(0), threading.Semaphore(0)
    real = san.write_pattern

    def spy(ns, pattern, run=None):  # on the worker thread
        if ns.nsid == 1:  # the first namespace of a pass: let the test look first
            at_pass.release()
            assert go.acquire(timeout=STEP)
        written.append((ns.nsid, pattern))
        real(ns, pattern, run)

    monkeypatch.setattr(san, "write_pattern", spy)
    cdw10 = OVERWRITE | (3 << 4) | OIPBP
    assert status(h)[1] == san.SSTAT_NEVER
    cid = h.submit(0, SANITIZE, cdw10=cdw10, cdw11=PATTERN)
    seen = []
    for done in range(3):
        assert at_pass.acquire(timeout=STEP)
        sprog, sos, opc, scdw10, gde = status(h)
        assert (sos, opc, scdw10, gde) == (san.SSTAT_SANITIZING, done, cdw10, False)
        seen.append(sprog)
        if done == 0:
            refused = h.admin(SANITIZE, cdw10=BLOCK_ERASE)
            assert (refused.sct, refused.sc) == (0, Generic.SANITIZE_IN_PROGRESS)
        go.release()
    assert seen == [0, 0x10000 // 3, 0x20000 // 3]  # one third of the bytes per pass
    assert h.wait(0, cid, timeout=STEP).ok
    assert written == [(n, p) for p in (PATTERN, INVERTED, PATTERN) for n in (1, 2, 3)]
    assert status(h) == (0xFFFF, san.SSTAT_COMPLETED, 3, cdw10, True)
    assert h.read(1, 0, 8).data == struct.pack("<I", PATTERN) * 1024
    assert h.read(2, 255, 1, lba_size=4096).data == struct.pack("<I", PATTERN) * 1024


def test_global_data_erased(emu):
    """GDE: clear before any sanitize, set by a successful one (on every controller), kept
    by a deallocation, cleared by the next write of user data."""
    e = emu(CFG)
    h, other = e.host(1), e.host(2)
    assert status(h)[4] is False  # history unknown: not claimed erased
    assert h.admin(SANITIZE, cdw10=BLOCK_ERASE).ok
    assert status(h)[1:] == (san.SSTAT_COMPLETED, 0, BLOCK_ERASE, True)
    assert status(other)[4] is True  # one log for the NVM subsystem
    assert h.deallocate(1, [(0, 8)]).ok
    assert status(h)[4] is True
    assert h.write(2, 0, bytes(4096), lba_size=4096).ok
    assert status(h)[4] is False and status(other)[4] is False
    assert h.admin(SANITIZE, cdw10=OVERWRITE | (1 << 4), cdw11=PATTERN).ok
    assert status(other)[1:] == (san.SSTAT_COMPLETED, 1, OVERWRITE | (1 << 4), True)


def test_controller_reset_during_a_sanitize_keeps_the_bookkeeping(emu, monkeypatch):
    """A Controller Level Reset while the file work runs drops the completion (its queue is
    gone) but not the rest: the bitmaps and the Sanitize Status log follow the files."""
    import time

    from emulator.nvme import namespace as ns_mod
    e = emu(CFG)
    h, other = e.host(1), e.host(2)
    assert other.write(3, 0, b"\x5a" * 4096).ok
    assert struct.unpack_from("<Q", other.identify(cns=0, nsid=3), 16)[0] == 8  # NUSE
    started, go = threading.Event(), threading.Event()
    real = ns_mod.Namespace.punch

    def slow_punch(self, slba, nlb):  # on the worker thread
        started.set()
        assert go.wait(STEP)
        real(self, slba, nlb)

    monkeypatch.setattr(ns_mod.Namespace, "punch", slow_punch)
    h.submit(0, SANITIZE, cdw10=BLOCK_ERASE)
    assert started.wait(STEP)
    h.disable()  # CC.EN 1 -> 0: Controller Level Reset of controller 1
    go.set()
    deadline = time.monotonic() + STEP
    while status(other)[1] != san.SSTAT_COMPLETED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert status(other)[1:] == (san.SSTAT_COMPLETED, 0, BLOCK_ERASE, True)
    assert struct.unpack_from("<Q", other.identify(cns=0, nsid=3), 16)[0] == 0  # deallocated


@pytest.mark.parametrize("path", ["c", "python", "off"])
def test_io_is_aborted_while_a_sanitize_runs(emu, monkeypatch, path):
    """While the sanitize operation runs, every controller of the subsystem aborts I/O
    commands with Sanitize In Progress, on the fast path's queues too; Flush is permitted
    (Base 2.1 §8.1.24).  Afterwards I/O runs again."""
    from emulator.nvme import fastpath

    old = fastpath.set_path(path)  # "c" without the C module is "python"
    try:
        _io_is_aborted_while_a_sanitize_runs(emu, monkeypatch)
    finally:
        fastpath.set_path(old)


def _io_is_aborted_while_a_sanitize_runs(emu, monkeypatch):
    e = emu(CFG)
    h, other = e.host(1), e.host(2)
    assert other.write(3, 0, b"\x5a" * 4096).ok
    at_pass, go = threading.Semaphore(0), threading.Semaphore(0)
    real = san.write_pattern

    def spy(ns, pattern, run=None):  # on the worker thread
        if ns.nsid == 1:
            at_pass.release()
            assert go.acquire(timeout=STEP)
        real(ns, pattern, run)

    monkeypatch.setattr(san, "write_pattern", spy)
    cid = h.submit(0, SANITIZE, cdw10=OVERWRITE | (1 << 4), cdw11=PATTERN)
    assert at_pass.acquire(timeout=STEP)
    try:
        for c in (other.read(3, 0, 8), other.write(3, 8, bytes(4096)), h.read(1, 0, 8)):
            assert (c.sct, c.sc) == (0, Generic.SANITIZE_IN_PROGRESS), c
        assert other.flush(3).ok and h.flush(1).ok
    finally:
        go.release()
    assert h.wait(0, cid, timeout=STEP).ok
    assert other.read(3, 0, 8).data == struct.pack("<I", PATTERN) * 1024
    assert other.write(3, 8, bytes(4096)).ok
