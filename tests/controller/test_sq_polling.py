"""Adaptive polling of shadow SQ tails (emulator/nvme/sqpoll.py), through the host driver
with shadow doorbells (Doorbell Buffer Config, Base 2.1 §5.1.7) as Linux uses them.

Most tests run an in-process controller whose deferred calls (poll turns) the test runs
by hand, with a clock the test moves: what a turn does is observable and nothing depends
on timing.  The others run over vfio-user on the real event loop and only wait for
outcomes (never assert a duration).
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from emulator.host.driver import NvmeHost
from emulator.host.memory import HostMemory
from emulator.host.transport import DirectTransport
from emulator.nvme import dbbuf, sqpoll
from emulator.nvme.config import ControllerConfig, NamespaceConfig
from emulator.nvme.dispatch import new_controller
from emulator.nvme.namespace import Namespace
from emulator.nvme.spec import IoOpcode
from emulator.subsystem.subsystem import Subsystem
from tp4159_common import IO, LM_CONFIG, MMC, hand_over

POLL = 0xFFFFFFFF
IDLE_US = 500


class Loop:
    """A scheduler whose call_soon callbacks the test runs, one loop turn at a time."""

    def __init__(self) -> None:
        self.soon: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.soon.append((fn, args))

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Any:
        raise AssertionError("no timers expected")

    def turn(self) -> int:
        due, self.soon = self.soon, []
        for fn, args in due:
            fn(*args)
        return len(due)


class Rig:
    """One controller in process, its host driver with shadow doorbells, a manual loop
    and a manual clock (nanoseconds) for the poller."""

    def __init__(self, qsize: int = 16, idle_us: int = IDLE_US, io_queues: int = 1) -> None:
        sub = Subsystem()
        sub.namespaces[1] = Namespace(NamespaceConfig(1, Path(tempfile.mkdtemp()) / "ns.img", 1 << 20),
                                      sub.nqn)
        self.loop = Loop()
        self.ctrl = new_controller(ControllerConfig(1, namespaces=(1,), sq_poll_idle_us=idle_us), sub,
                                   scheduler=self.loop)
        sub.controllers[1] = self.ctrl
        self.t = DirectTransport(self.ctrl, HostMemory(8 << 20))
        self.h = NvmeHost(self.t)
        self.h.init(io_queues=io_queues, qsize=qsize)
        assert self.h.enable_shadow_doorbells().ok
        self.now = 0
        self.poller = sqpoll.poller(self.ctrl)
        self.poller.clock = lambda: self.now
        self.buf = self.h.mem.alloc(4096)

    def submit(self, n: int = 1) -> list[int]:
        """Reads of LBA 0 through the driver: it rings the MMIO doorbell only if EventIdx says so."""
        return [self.h.submit(1, IoOpcode.READ, nsid=1, prp1=self.buf) for _ in range(n)]

    def done(self) -> set[int]:
        return {c.cid for c in self.h.reap(1) if c.sc == 0}

    def idle(self) -> None:
        """Let the idle spell pass and run the loop until the poller has nothing left."""
        self.now += IDLE_US * 1000
        while self.loop.turn():
            pass


def test_busy_sq_is_polled_and_submissions_need_no_mmio() -> None:
    r = Rig()
    assert r.h.event_idx(1) == 0  # armed at the tail of the new SQ
    first = r.submit()
    assert r.h.sq_mmio == 1  # crosses EventIdx 0: rings; the controller starts polling
    assert r.done() == set(first) and r.h.event_idx(1) == POLL
    for _ in range(40):  # several laps of the 16-entry queue, one command at a time
        cids = r.submit()
        r.loop.turn()
        assert r.done() == set(cids)
    # Only a wrap of the tail crosses EventIdx 0xFFFF (Linux's u16 test): 41 commands
    # through 16 slots wrap twice.
    assert r.h.sq_mmio == 1 + 41 // 16
    assert r.poller.found == 40 - 41 // 16


def test_polling_shortens_the_loop_threads_timer_slack() -> None:
    """The nap between empty poll turns ends on time: the thread's slack is NAP_SLACK_NS."""
    import threading

    from cbind import timerslack
    if timerslack.get_ns() is None:
        pytest.skip("no cffi: the slack cannot be read (pip install cffi)")
    out: list[tuple[int | None, int | None]] = []

    def body() -> None:  # its own thread: the slack is per thread (and inherited)
        timerslack.set_ns(50_000)  # Linux's default
        before = timerslack.get_ns()
        test_busy_sq_is_polled_and_submissions_need_no_mmio()
        out.append((before, timerslack.get_ns()))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert out and out[0][0] != sqpoll.NAP_SLACK_NS and out[0][1] == sqpoll.NAP_SLACK_NS


def test_idle_spell_rearms_and_the_next_submission_rings() -> None:
    r = Rig()
    r.submit()
    r.done()
    r.loop.turn()  # a turn before the idle spell: still polling
    assert r.h.event_idx(1) == POLL and r.loop.soon
    r.idle()
    sq = r.ctrl.sqs[1]
    assert r.h.event_idx(1) == sq.tail and not r.loop.soon and r.poller.rearms == 1
    cids = r.submit()
    assert r.h.sq_mmio == 2  # rang: the controller runs it at once and polls again
    assert r.done() == set(cids) and r.h.event_idx(1) == POLL


class RacingMemory:
    """Guest memory that lets the host submit just before the controller's EventIdx store
    lands: the host reads the old EventIdx (POLL) and does not ring."""

    def __init__(self, inner: Any, when: Callable[[int, bytes], bool], race: Callable[[], None]) -> None:
        self.inner, self.when, self.race = inner, when, race

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def store_now(self, addr: int, data: bytes) -> None:
        if self.when(addr, bytes(data)):
            self.when = lambda a, d: False
            self.race()
        self.inner.store_now(addr, data)


def test_submission_racing_with_the_rearm_is_not_lost() -> None:
    r = Rig()
    r.submit()
    r.done()
    _db, ei = r.ctrl.state.vendor[dbbuf.KEY]
    raced: list[int] = []
    r.ctrl.memory = RacingMemory(r.ctrl.memory, lambda addr, data: addr == ei + 8 and data != b"\xff" * 4,
                                 lambda: raced.extend(r.submit()))
    r.now += IDLE_US * 1000
    r.loop.turn()  # the re-arm: the host submits between its decision and the EventIdx store
    assert raced and r.h.sq_mmio == 1  # the racing submission did not ring...
    assert r.done() == set(raced)  # ...and still ran: found by the re-check after the barrier
    assert r.poller.races == 1 and r.h.event_idx(1) == POLL and r.loop.soon  # busy: polling again
    r.idle()
    assert r.h.event_idx(1) == r.ctrl.sqs[1].tail and not r.loop.soon


def test_idle_controller_runs_no_poll_turns() -> None:
    """No turn is scheduled once the idle spell re-armed every SQ, and wakes that bring
    no command (a CQ head doorbell, a DMA map) do not start polling."""
    r = Rig()
    assert not r.loop.soon and r.poller.turns == 0  # created, configured: not polled
    r.submit()
    r.done()
    r.idle()
    turns = r.poller.turns
    r.ctrl.kick()  # what a CQ head doorbell or a DMA map does
    r.ctrl.set_memory(r.ctrl.memory)
    for _ in range(100):
        r.loop.turn()
    assert r.poller.turns == turns and not r.loop.soon
    assert r.h.event_idx(1) == r.ctrl.sqs[1].tail


def test_queue_deletion_and_reset_stop_polling() -> None:
    r = Rig(io_queues=2)
    for qid in (1, 2):
        cid = r.h.submit(qid, IoOpcode.READ, nsid=1, prp1=r.buf)
        assert r.h.wait(qid, cid).ok
    assert set(r.poller.polled) == {1, 2}
    r.h.delete_io_queue_pair(2)
    r.loop.turn()
    assert set(r.poller.polled) == {1}
    r.h.create_io_queue_pair(2, 16)  # the same id again: a new queue, armed, not polled
    assert set(r.poller.polled) == {1} and r.h.event_idx(2) == 0
    r.h.disable()  # Controller Level Reset: shadow doorbells off, nothing polled
    assert not r.poller.polled
    while r.loop.turn():
        pass
    assert not r.loop.soon


def test_off_keeps_every_submission_ringing() -> None:
    r = Rig(idle_us=0)
    for _ in range(5):
        cids = r.submit()
        assert r.done() == set(cids)
    assert r.h.sq_mmio == 5 and r.h.event_idx(1) == r.ctrl.sqs[1].tail
    assert not r.loop.soon and sqpoll.existing(r.ctrl) is r.poller and r.poller.turns == 0


# ------------------------------------------------------------------ over vfio-user
def _lm_config(idle_us: int) -> dict[str, Any]:
    cfg = copy.deepcopy(LM_CONFIG)
    cfg["controllers"][0].update(doorbell_buffer=True, sq_poll_idle_us=idle_us)
    return cfg


def _wait(what: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = what()
        if v:
            return v
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def test_suspend_stops_polling_and_resume_restarts_it(emu: Any) -> None:
    from emulator.host.lm import MigrationHost
    e = emu(_lm_config(1_000_000))  # an idle spell longer than the test: only suspend stops it
    g = e.host(IO, qsize=64)
    assert g.enable_shadow_doorbells().ok
    m = MigrationHost(e.host(MMC))
    ctrl = e.subsystem.controllers[IO]
    buf = g.mem.alloc(4096)
    assert g.read(1, 0, 1).ok
    # EventIdx is written after the CQE (the doorbell's end): the host may see the CQE first
    assert g.sq_mmio == 1 and _wait(lambda: g.event_idx(1) == POLL)
    for _ in range(20):
        assert g.read(1, 0, 1).ok  # found by polling
    assert g.sq_mmio == 1
    assert m.suspend(IO).ok
    turns = _wait(lambda: e.call(lambda: None if sqpoll.existing(ctrl).active else sqpoll.existing(ctrl).turns))
    cid = g.submit(1, IoOpcode.READ, nsid=1, prp1=buf)  # EventIdx still POLL: shadow only
    assert g.sq_mmio == 1
    time.sleep(0.05)
    assert e.call(lambda: sqpoll.existing(ctrl).turns) == turns  # suspended: no turn, nothing fetched
    assert cid in g.queues[1].outstanding and not g.reap(1)
    assert m.resume(IO).ok  # reads the shadow tail, runs it, polls again
    assert g.wait(1, cid).ok and g.sq_mmio == 1
    assert e.call(lambda: sqpoll.existing(ctrl).active)
    assert g.read(1, 0, 1).ok and g.sq_mmio == 1


def test_polling_over_vfio_user_then_idle(emu: Any) -> None:
    """End to end on the real event loop, two controllers of one process polled side by
    side: submissions after the first one need no doorbell message; after the idle spell
    the EventIdx is armed again and no poll turn runs."""
    cfg = {"namespaces": [{"nsid": 1, "size": "16MiB", "lba_size": 512}],
           "controllers": [{"cntlid": c, "type": "io", "namespaces": [1], "sq_poll_idle_us": 20_000}
                           for c in (1, 2)]}
    e = emu(cfg)
    hosts = [e.host(c, qsize=32) for c in (1, 2)]
    for h in hosts:
        assert h.enable_shadow_doorbells().ok
    data = bytes(range(256)) * 2
    for i in range(50):  # in turn on both: each keeps its SQ busy within the idle spell
        for h in hosts:
            assert h.write(1, i, data).ok
    for h in hosts:
        assert h.read(1, 49, 1).data == data
        assert h.sq_mmio <= 1 + 51 // 32  # the first one, and wraps of the tail
        assert h.sq_shadow_only >= 40
    ctrls = [e.subsystem.controllers[c] for c in (1, 2)]
    for h, ctrl in zip(hosts, ctrls):
        _wait(lambda: h.event_idx(1) != POLL)
        turns = e.call(lambda: sqpoll.existing(ctrl).turns)
        time.sleep(0.05)
        assert e.call(lambda: (sqpoll.existing(ctrl).active, sqpoll.existing(ctrl).turns)) == (False, turns)
        before = h.sq_mmio
        assert h.read(1, 0, 1).ok
        assert h.sq_mmio == before + 1  # armed again: the next submission rings


@pytest.mark.parametrize("idle_us", [0, 300])
def test_many_commands_racing_the_idle_spell_all_complete(emu: Any, idle_us: int) -> None:
    """Bursts separated by pauses around the idle spell: re-arms race with submissions;
    every command completes (none is left in the SQ unseen)."""
    e = emu({"namespaces": [{"nsid": 1, "size": "16MiB", "lba_size": 512}],
             "controllers": [{"cntlid": 1, "type": "io", "sq_poll_idle_us": idle_us}]})
    h = e.host(1, qsize=16)
    assert h.enable_shadow_doorbells().ok
    buf = h.mem.alloc(4096)
    for rnd in range(60):
        cids = [h.submit(1, IoOpcode.READ, nsid=1, prp1=buf) for _ in range(1 + rnd % 5)]
        for cid in cids:
            assert h.wait(1, cid, timeout=10).ok
        if rnd % 3 == 0:
            time.sleep(idle_us * 1e-6 * (rnd % 7) / 3)


def test_destination_serves_a_guest_left_with_the_poll_eventidx(emu: Any) -> None:
    """The source polled (EventIdx 0xFFFFFFFF in guest memory) when it was suspended, and
    the guest submitted meanwhile without ringing.  The destination, which does not poll,
    runs that command at its Resume and arms EventIdx: the next submission rings there."""
    from emulator.host.lm import MigrationHost
    src, dst = emu(_lm_config(1_000_000)), emu(_lm_config(0))
    g = NvmeHost(src.connect(IO))
    src.hosts.append(g)
    g.init(io_queues=1, qsize=64)
    assert g.enable_shadow_doorbells().ok
    assert g.read(1, 0, 1).ok and _wait(lambda: g.event_idx(1) == POLL)  # written after the CQE
    mmhs, mmhd = MigrationHost(src.host(MMC)), MigrationHost(dst.host(MMC))
    assert mmhs.suspend(IO).ok
    cid = g.submit(1, IoOpcode.READ, nsid=1, prp1=g.mem.alloc(4096))
    assert g.sq_mmio == 1  # shadow only
    source_transport = hand_over(mmhs, mmhd, g, dst)
    assert g.wait(1, cid).ok
    assert _wait(lambda: g.event_idx(1) == dst.call(lambda: dst.subsystem.controllers[IO].sqs[1].tail))
    assert g.read(1, 0, 1).ok and g.sq_mmio == 2
    source_transport.close()
