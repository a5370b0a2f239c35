"""Adaptive polling of shadow SQ tails (Doorbell Buffer Config, Base 2.1 §5.1.7).

With shadow doorbells the host writes every new SQ tail into the Shadow
Doorbell buffer and rings the MMIO doorbell only when the new value crosses
the controller's EventIdx.  Linux (nvme_dbbuf_need_event) rings when
``(u16)(new - EventIdx - 1) < (u16)(new - old)``, ``old`` being the previous
shadow value, all in 16-bit arithmetic.  Under vfio-user every MMIO doorbell
is a message to this process and a wakeup; while a queue is busy, reading the
shadow tail from guest memory is far cheaper.

So, per I/O SQ of a controller whose ``sq_poll_idle_us`` is not 0:

* **Polling.**  A doorbell that brings new commands (an MMIO write, or the
  shadow tail moved while nobody looked: resume, a DMA map) starts polling
  the SQ: its EventIdx becomes ``POLL`` (0xFFFFFFFF, u16 0xFFFF), and the
  poller reads its shadow tail once per event-loop turn and runs what it
  finds.  With EventIdx 0xFFFF the test above is false for every ``old <=
  new``: the host rings only when its tail wraps (``new < old``), once per
  lap of the queue (as SPDK's vfio-user target in poll mode does).  A turn
  that finds nothing naps briefly (``NAP_SECONDS``) before the next one.
* **Idle spell.**  When ``sq_poll_idle_us`` passes without a new command on
  the SQ, the poller re-arms it: EventIdx := the processed tail, a full
  barrier, then the shadow tail is read again.  A submission that raced with
  the store (the host read the old EventIdx and did not ring) is found by
  that read: it runs, and the SQ goes back to polling.  Every later
  submission crosses the EventIdx, so the host rings.
* **No turn without a polled SQ**: an idle controller costs no CPU.

The poller stops looking (without writing anything) when the controller
cannot fetch: suspended (TP4159: a suspended controller writes nothing into
host memory, EventIdx included), disabled, or without guest memory.  The
EventIdx then stays at ``POLL`` in host memory, so the host does not ring;
whatever wakes the controller again (Migration Send Resume, a DMA map, Set
Controller State) goes through ``Controller.kick``, which reads every shadow
tail and re-decides per SQ (poll or arm).  A Controller Level Reset or a
function reset turns shadow doorbells off and drops the poller's SQs; a
deleted (or re-created) SQ is dropped too.

The poller is runtime state only (nothing of it is migrated: the destination
decides from the shadow tails at its resume).  One poller per controller; the
controllers of one process share the event loop and each polls only its own
SQs, through its own bounded arbiter passes (emulator/nvme/arbitration.py).
"""
from __future__ import annotations

import logging
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable

from cbind import timerslack
from emulator.nvme import dbbuf, sqwait

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.state import SQState

log = logging.getLogger("nvme.sqpoll")
POLL = 0xFFFFFFFF  # the SQ EventIdx while polling: the host rings only at a wrap of its tail
# A turn that found nothing sleeps this long (plus the kernel's timer slack, 50 us by
# default) before the loop's next iteration.  Spinning instead (asyncio cannot wait on
# its sockets for less than 1 ms) made the emulator a CPU hog that, on a loaded machine,
# waited behind other work for its time slice and lost more than polling gained
# (docs/performance.md); a nap keeps it a sleeper that the scheduler wakes promptly.
# Socket messages wait at most one nap per polling controller.
NAP_SECONDS = 20e-6
# Linux lets a sleep end late by the thread's timer slack (50 us by default), which made
# the 20 us nap last 70-100 us.  The loop thread's slack becomes 1 us once it polls
# (cbind/timerslack.py: prctl PR_SET_TIMERSLACK; `python -m emulator.bench.naps`).
NAP_SLACK_NS = 1000


class SqPoller:
    """The polled SQs of one controller and the scheduled poll turn."""

    def __init__(self, ctrl: "Controller") -> None:
        self.ctrl = ctrl
        self.idle_ns = idle_us(ctrl) * 1000
        self.clock: Callable[[], int] = time.monotonic_ns  # tests replace it
        self.polled: dict[int, int] = {}  # SQ id -> clock of the last new command seen
        self.seen: dict[int, int] = {}  # polled SQ id -> its tail then
        # polled SQ id -> (when C's turn left it empty, the host's usual gap after that,
        # its tail then): the arrival estimate of cbind/sqwait.c, kept between waits
        self.arrival: dict[int, tuple[int, int, int]] = {}
        self.armed: dict[int, int] = {}  # SQ id -> the tail its EventIdx was armed at
        self._handle: Any = None  # the scheduled turn, or None
        self._gen = 0  # a turn scheduled before stop() does nothing (a scheduler may not cancel)
        # Counters (not state): turns run, commands found by polling (no doorbell
        # message), re-arms, re-arms that found a racing submission.
        self.turns = self.found = self.rearms = self.races = 0
        self.announced = False

    @property
    def active(self) -> bool:
        return self._handle is not None

    # -- decisions ---------------------------------------------------------------
    def doorbell_done(self, sq: "SQState") -> None:
        """``sq`` was processed after a doorbell or a kick: poll it if it brought new
        commands since its EventIdx was armed, else (re-)arm its EventIdx."""
        qid = sq.qid
        if qid in self.polled:  # EventIdx is POLL already; the next turn looks again
            if self.seen.get(qid) != sq.tail:  # commands came by doorbell (a wrap) or a kick
                self.polled[qid], self.seen[qid] = self.clock(), sq.tail
            return
        if self.armed.get(qid) == sq.tail and not self._arm(sq):
            return  # nothing new: armed again, as without polling
        if qid in self.ctrl.sqs:
            self._start(sq)

    def armed_at(self, qid: int, tail: int) -> None:
        """dbbuf armed SQ ``qid``'s EventIdx at ``tail`` (queue created, buffer configured)."""
        self.polled.pop(qid, None)
        self.armed[qid] = tail

    def _start(self, sq: "SQState") -> None:
        cfg = dbbuf.config(self.ctrl)
        if cfg is None:
            return
        self.armed.pop(sq.qid, None)
        self.polled[sq.qid], self.seen[sq.qid] = self.clock(), sq.tail
        if not self.announced:  # once per controller: polling is in use
            self.announced = True
            timerslack.set_ns(NAP_SLACK_NS)  # the loop thread's naps end on time (NAP_SLACK_NS)
            log.info("ctrl %d: polling shadow SQ tails while busy (idle spell %d us)",
                     self.ctrl.cntlid, self.idle_ns // 1000)
        dbbuf.set_sq_event_idx(self.ctrl, sq, POLL)
        self._schedule()

    def _arm(self, sq: "SQState") -> bool:
        """EventIdx := processed tail, barrier, re-check (dbbuf.arm_sq_event_idx); True if a
        racing submission was found (and run): the SQ is busy, poll it instead."""
        if dbbuf.arm_sq_event_idx(self.ctrl, sq):
            self.races += 1
            return True
        self.armed[sq.qid] = sq.tail
        return False

    def _schedule(self) -> None:
        sched = self.ctrl.scheduler
        if self._handle is None and sched is not None:
            hub = sqwait.hub(self.ctrl)
            if hub is not None:  # the turns run in C while the loop waits (sqwait.py)
                hub.add(self)
                self._handle = hub
                return
            self._handle = sched.call_soon(self._turn, self._gen) or True

    # -- the C turns (emulator/nvme/sqwait.py) -------------------------------------
    def shadow(self) -> tuple[int, int] | None:
        """The Doorbell Buffer Config (shadow buffer, EventIdx buffer), or None."""
        return dbbuf.config(self.ctrl)

    def python_turn(self) -> None:
        """The hub cannot run this controller's turns in C now: a Python turn instead."""
        self._handle = None
        sched = self.ctrl.scheduler
        if self.polled and sched is not None:
            self._handle = sched.call_soon(self._turn, self._gen) or True

    def c_returned(self, sq: "SQState", idle: bool) -> None:
        """The C turns left ``sq`` to Python: its idle spell is over (or a shadow value
        was out of range), so arm its EventIdx as a Python turn would; or the command at
        its head is one for the normal path, so run the SQ."""
        ctrl = self.ctrl
        qid = sq.qid
        if ctrl.sqs.get(qid) is not sq or qid not in self.polled or not ctrl.can_fetch():
            return  # deleted, stopped, suspended meanwhile: whatever did that decides
        if idle:
            self.rearms += 1
            del self.polled[qid]
            if self._arm(sq) and qid in ctrl.sqs:
                self._start(sq)  # a submission raced with the re-arm: still busy
        else:
            ctrl.process_sq(sq)
        ctrl.flush_interrupts()

    def stop(self) -> None:
        """Forget every SQ (reset, shadow doorbells off); the EventIdx values stay as they are."""
        self.polled.clear()
        self.armed.clear()
        self.seen.clear()
        self.arrival.clear()
        self._gen += 1
        if isinstance(self._handle, sqwait.Hub):
            self._handle.remove(self)
        else:
            cancel = getattr(self._handle, "cancel", None)
            if cancel is not None:
                cancel()
        self._handle = None

    # -- the poll turn -----------------------------------------------------------
    def _turn(self, gen: int) -> None:
        if gen != self._gen:
            return  # scheduled before stop()
        self._handle = None
        self.turns += 1
        ctrl = self.ctrl
        cfg = dbbuf.config(ctrl)
        if cfg is None or not ctrl.can_fetch():
            # Reset, suspended, disabled or no memory: stop looking, write nothing.
            # Controller.kick re-decides every SQ when the controller can fetch again.
            self.polled.clear()
            return
        now = self.clock()
        got = False
        for qid, last in list(self.polled.items()):
            sq = ctrl.sqs.get(qid)
            if sq is None:
                del self.polled[qid]  # deleted
                continue
            tail = dbbuf.shadow_sq_tail(ctrl, sq)
            if tail is not None and tail != sq.tail:
                self.found += (tail - sq.tail) % sq.size
                sq.tail = tail
                self.polled[qid], self.seen[qid] = now, tail
                got = True
                ctrl.process_sq(sq)
            elif now - last >= self.idle_ns:
                self.rearms += 1
                del self.polled[qid]
                if self._arm(sq):
                    got = True
                    if qid in ctrl.sqs:
                        self._start(sq)  # a submission raced with the re-arm: still busy
        if got:
            ctrl.flush_interrupts()  # one interrupt per CQ for what this turn completed
        if not ctrl.can_fetch():
            self.polled.clear()  # as above: the wake that ends it goes through kick
        elif self.polled:
            if not got:
                time.sleep(NAP_SECONDS)  # nothing new: give the core away briefly (see NAP_SECONDS)
            self._schedule()


_pollers: "weakref.WeakKeyDictionary[Controller, SqPoller]" = weakref.WeakKeyDictionary()


# The idle spell where ``sq_poll_idle_us`` is not set and the turns run in C: longer than
# a queue-depth-1 host's turnaround under TCG (200-400 us), so such a host never rings.
AUTO_IDLE_US = 1000


def idle_us(ctrl: "Controller") -> int:
    """The controller's idle spell: ``sq_poll_idle_us``, or when it is not set (None)
    AUTO_IDLE_US where the poll turns run in C (sqwait.hub), else 0 (no polling: Python
    turns cost more than they save, docs/performance.md)."""
    v = ctrl.config.sq_poll_idle_us
    if v is None:
        return AUTO_IDLE_US if sqwait.hub(ctrl) is not None else 0
    return v


def enabled(ctrl: "Controller") -> bool:
    """Polling configured (``sq_poll_idle_us``) and possible (an event loop to poll on)."""
    return ctrl.scheduler is not None and idle_us(ctrl) > 0


def poller(ctrl: "Controller") -> SqPoller:
    p = _pollers.get(ctrl)
    if p is None:
        p = _pollers[ctrl] = SqPoller(ctrl)
    return p


def existing(ctrl: "Controller") -> SqPoller | None:
    """The controller's poller if it ever polled (tests, statistics)."""
    return _pollers.get(ctrl)


def on_reset(ctrl: "Controller") -> None:
    """Controller Level Reset: shadow doorbells are off, nothing is polled."""
    p = _pollers.get(ctrl)
    if p is not None:
        p.stop()
