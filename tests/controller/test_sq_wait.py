"""The shadow SQ tail poller's turns in C (emulator/nvme/sqwait.py, cbind/sqwait.c), over
vfio-user on the real event loop: what C serves, what it hands back to Python, and that
Python's view of the queues and counters is the one C left.  Outcomes only, no timing.
"""
from __future__ import annotations

import time
from typing import Any

import pytest

from cbind import ioq
from emulator.nvme import fastpath, sqpoll, sqwait
from emulator.nvme.spec import IoOpcode
from test_sq_polling import _wait  # (pytest puts this directory on sys.path)

pytestmark = pytest.mark.skipif(ioq.LIB is None, reason="C fast path not built (needs cffi and a C "
                                "compiler: bash scripts/setup)")

POLL = 0xFFFFFFFF


def _cfg(idle_us: int = 1_000_000, **extra: Any) -> dict[str, Any]:
    ctrl = {"cntlid": 1, "type": "io", "sq_poll_idle_us": idle_us}
    ctrl.update(extra)
    return {"namespaces": [{"nsid": 1, "size": "16MiB", "lba_size": 512}], "controllers": [ctrl]}


@pytest.fixture(autouse=True)
def _c_path() -> Any:
    old = fastpath.set_path("c")
    yield
    fastpath.set_path(old)


def _stats(e: Any) -> tuple[int, int, int, dict[str, int]]:
    ctrl = e.subsystem.controllers[1]

    def get() -> tuple[int, int, int, dict[str, int]]:
        p = sqpoll.existing(ctrl)
        h = sqwait.hub(ctrl)
        return (p.turns if p else 0, h.waits if h else 0, h.returns if h else 0,
                dict(ctrl.fast.completed))
    return e.call(get)


def test_c_turns_serve_shadow_submissions(emu: Any) -> None:
    """After the first doorbell, reads and writes are found in the shadow buffer and
    served by C: no doorbell message, no Python poll turn, data and counters as usual."""
    e = emu(_cfg())
    h = e.host(1, qsize=16)
    assert h.enable_shadow_doorbells().ok
    assert h.read(1, 0, 1).ok
    assert _wait(lambda: h.event_idx(1) == POLL)
    before = _stats(e)
    data = bytes(range(256)) * 2
    for i in range(40):  # wraps the 16-entry SQ twice: those wraps ring
        assert h.write(1, i, data).ok
        assert h.read(1, i, 1).data == data
    turns, waits, _, done = _stats(e)
    assert waits > before[1]
    assert turns == before[0]  # no Python turn: C found them
    assert done["c"] - before[3]["c"] >= 60
    assert h.sq_mmio <= 1 + 81 // 15 + 1
    ctrl = e.subsystem.controllers[1]
    smart = e.call(lambda: (ctrl.stats["host_write_commands"], ctrl.stats["host_read_commands"]))
    assert smart[0] >= 40 and smart[1] >= 41
    # Python's view of the rings is the one C left: the SQ is empty, heads match
    sq, cq = e.call(lambda: (vars(ctrl.sqs[1]).copy(), vars(ctrl.cqs[1]).copy()))
    assert sq["head"] == sq["tail"] == h.queues[1].sq_tail


def test_command_for_python_goes_back_and_polling_goes_on(emu: Any) -> None:
    """A Flush and an out-of-range Read at the SQ head are not the fast path's: C hands the
    SQ to Python, which runs them with their statuses, and C serves the next ones."""
    e = emu(_cfg())
    h = e.host(1, qsize=16)
    assert h.enable_shadow_doorbells().ok
    assert h.read(1, 0, 1).ok and _wait(lambda: h.event_idx(1) == POLL)
    buf = h.mem.alloc(4096)
    _, _, returns, _ = _stats(e)
    for _ in range(5):
        assert h.flush(1).ok
        bad = h.submit(1, IoOpcode.READ, nsid=1, prp1=buf, cdw10=1 << 20, cdw12=0)  # past NSZE
        c = h.wait(1, bad)
        assert (c.sct, c.sc) == (0, 0x80)  # LBA Out of Range (NVM CS 1.2 Figure 13)
        assert h.read(1, 3, 1).ok
    assert _stats(e)[2] >= returns + 10
    assert h.sq_mmio <= 2


def test_idle_spell_in_c_rearms_and_next_submission_rings(emu: Any) -> None:
    e = emu(_cfg(idle_us=20_000))
    h = e.host(1, qsize=16)
    assert h.enable_shadow_doorbells().ok
    for i in range(10):
        assert h.read(1, i, 1).ok
    ctrl = e.subsystem.controllers[1]
    _wait(lambda: h.event_idx(1) != POLL)
    assert not e.call(lambda: sqpoll.existing(ctrl).active)
    before = h.sq_mmio
    assert h.read(1, 0, 1).ok
    assert h.sq_mmio == before + 1


def test_coalescing_keeps_the_turns_in_python(emu: Any) -> None:
    """Interrupt coalescing (Feature 08h) is Python's to decide: the turns run there."""
    e = emu(_cfg())
    h = e.host(1, qsize=16)
    assert h.set_features(0x08, 0x0103).ok  # aggregation threshold 4, time 1 (100 us)
    assert h.enable_shadow_doorbells().ok
    assert h.read(1, 0, 1).ok and _wait(lambda: h.event_idx(1) == POLL)
    t0, _, _, done0 = _stats(e)
    for i in range(10):
        assert h.read(1, i, 1).ok
    turns, _, _, done = _stats(e)
    assert turns > t0


def test_a_failing_c_turn_hands_the_sqs_back_to_python(emu: Any, monkeypatch: Any) -> None:
    """A bug in the hub (here: planning raises) must not strand a polled SQ whose host
    no longer rings: the hub is given up and the turns go on in Python."""
    e = emu(_cfg())
    h = e.host(1, qsize=16)
    assert h.enable_shadow_doorbells().ok
    assert h.read(1, 0, 1).ok and _wait(lambda: h.event_idx(1) == POLL)

    def boom(_p: Any) -> None:
        raise RuntimeError("planted")
    monkeypatch.setattr(sqwait, "_plan", boom)
    for i in range(20):
        assert h.read(1, i, 1).ok
    ctrl = e.subsystem.controllers[1]
    assert e.call(lambda: sqwait.hub(ctrl)) is None  # given up
    assert _stats(e)[0] > 0  # Python turns served them
    assert h.sq_mmio <= 3


@pytest.mark.parametrize("hold_us", [0, 200])
def test_every_completion_is_signalled(emu: Any, monkeypatch: Any, hold_us: int) -> None:
    """Whatever C posts is followed by an interrupt on the CQ's vector: at once, or with
    the hold (NVME_EMU_SQ_HOLD_US) once the host read the completions it was told of or
    the hold ran out, or by Python when C returns with completions held."""
    monkeypatch.setattr(sqwait, "HOLD_NS", hold_us * 1000)
    e = emu(_cfg())
    h = e.host(1, qsize=16)
    assert h.enable_shadow_doorbells().ok
    assert h.read(1, 0, 1).ok and _wait(lambda: h.event_idx(1) == POLL)
    while h.t.wait_irq(1, 0.05):  # the interrupts so far
        pass
    buf = h.mem.alloc(4096)
    for rnd in range(30):
        cids = [h.submit(1, IoOpcode.READ, nsid=1, prp1=buf) for _ in range(1 + rnd % 6)]
        for cid in cids:
            assert h.wait(1, cid).ok
        assert h.t.wait_irq(1, 10.0)  # (an eventfd: several writes read as one)
    assert h.sq_mmio <= 1 + 120 // 15 + 1


def test_a_shadow_tail_out_of_range_goes_back_to_python(emu: Any) -> None:
    """A host that writes a shadow SQ tail past its queue: C leaves the SQ to Python, which
    ignores the value (as it does without polling) and re-arms the EventIdx at the tail it
    processed; nothing is fetched, the process goes on, and later submissions complete."""
    import struct
    e = emu(_cfg())
    h = e.host(1, qsize=16)
    assert h.enable_shadow_doorbells().ok
    assert h.read(1, 0, 1).ok and _wait(lambda: h.event_idx(1) == POLL)
    db = h.shadow[0]
    good = struct.unpack("<I", h.mem.read(db + 8, 4))[0]
    h.mem.write(db + 8, struct.pack("<I", 999))  # SQ 1 tail, 999 >= 16 entries
    ctrl = e.subsystem.controllers[1]
    _wait(lambda: h.event_idx(1) == good)  # re-armed at the processed tail
    assert e.call(lambda: ctrl.sqs[1].tail) == good
    h.mem.write(db + 8, struct.pack("<I", good))
    for i in range(5):
        assert h.read(1, i, 1).ok


@pytest.mark.parametrize("early_us", [0, 20])
def test_a_host_with_a_turnaround_gets_an_arrival_estimate(emu: Any, monkeypatch: Any,
                                                          early_us: int) -> None:
    """A host that takes its time between a completion and its next command (a guest's
    kernel and application do) gets an arrival estimate, kept between waits: C naps until
    shortly before the next command is due (NVME_EMU_SQ_EARLY_US; 0: the usual naps).
    Whatever the estimate, every command is served without a doorbell: one that comes
    much sooner than expected, and one that comes much later."""
    monkeypatch.setattr(sqwait, "EARLY_NS", early_us * 1000)
    e = emu(_cfg())
    h = e.host(1, qsize=16)
    assert h.enable_shadow_doorbells().ok
    assert h.read(1, 0, 1).ok and _wait(lambda: h.event_idx(1) == POLL)
    ctrl = e.subsystem.controllers[1]
    turns = _stats(e)[0]
    for i in range(30):
        assert h.read(1, i, 1).ok
        time.sleep(0.0003)
    empty, gap, tail = e.call(lambda: sqpoll.existing(ctrl).arrival.get(1, (0, 0, -1)))
    assert gap > 0 and tail == h.queues[1].sq_tail
    for i in range(30):  # sooner: at once
        assert h.read(1, i, 1).ok
    for i in range(5):  # later: past any estimate (sqwait.c SQW_EXPECT_MAX_NS)
        time.sleep(0.005)
        assert h.read(1, i, 1).ok
    assert h.sq_mmio <= 1 + 66 // 15 + 1  # the wraps of the 16-entry SQ
    assert _stats(e)[0] == turns  # no Python turn: C served them all


@pytest.mark.parametrize("turn_kib", [0, 64])
def test_large_commands_are_signalled_one_by_one(emu: Any, monkeypatch: Any, turn_kib: int) -> None:
    """A turn stops after NVME_EMU_SQ_TURN_KIB of data, signals what it posted and the
    next turn goes on at once: four 128 KiB reads submitted together get an interrupt
    each (0: one for the turn), and C serves them all without handing the SQ back."""
    monkeypatch.setattr(sqwait, "TURN_BYTES", turn_kib * 1024)
    e = emu(_cfg())
    h = e.host(1, qsize=16)
    assert h.enable_shadow_doorbells().ok
    data = bytes(range(256)) * 512  # 128 KiB
    assert h.write(1, 0, data).ok and _wait(lambda: h.event_idx(1) == POLL)
    ctrl = e.subsystem.controllers[1]
    hub = e.call(lambda: sqwait.hub(ctrl))
    _, _, returns, _ = _stats(e)
    irqs = e.call(lambda: hub.irqs)
    bufs = [h.mem.alloc(len(data)) for _ in range(4)]
    cids = []
    for buf in bufs:
        prp1, prp2, _lists = h.build_prps(buf, len(data))
        cids.append(h.submit(1, IoOpcode.READ, nsid=1, prp1=prp1, prp2=prp2, cdw12=255, ring=False))
    h.ring_sq(1)  # one tail update for the four
    for cid in cids:
        assert h.wait(1, cid).ok
    assert all(h.mem.read(buf, len(data)) == data for buf in bufs)
    signalled = e.call(lambda: hub.irqs) - irqs
    assert signalled >= (4 if turn_kib else 1)
    assert _stats(e)[2] == returns
