"""The shadow SQ tail poller's turns in C, while the event loop waits.

emulator/nvme/sqpoll.py decides which I/O SQs are polled (EventIdx 0xFFFFFFFF:
the host rings only at a wrap of its tail) and when an idle spell ends.  Run
in Python, a poll turn is an event-loop callback per turn, a guest-memory
read per SQ and a nap; the command the host submits waits for all that, and
the turns cost CPU whether they find something or not.

Where the loop is an emulator.pollloop loop and the C fast path is in use,
the turns run in C instead (``sqw_wait`` of cbind/sqwait.c): when the loop
would block in ``select``, the ``Hub`` of that loop hands C one entry per
polled SQ (the fast path's batch struct, the host addresses of the shadow SQ
tail and shadow CQ head, the eventfd of the CQ's interrupt vector, the ring
indices), and C reads the shadow tails, serves Reads and Writes exactly as
the fast path does (cbind/ioq.c), writes the eventfd after each turn that
posted, and returns when a socket or timer needs the loop, or an SQ needs
Python (a command the fast path leaves to the normal path, an idle spell
over, a shadow value out of range).  Between turns it spins for
``SPIN_NS`` after the last command it saw, then naps ``NAP_NS`` per command
of the last busy turn (at most ``NAP_MAX_NS``) in the loop's epoll, so a
message ends the nap at once.

While C runs, no Python code of this thread runs, so the queue state in
Python is stale but never raced: right after ``sqw_wait`` returns (still
inside ``select``, before any callback), ``_sync`` copies the ring indices
back and adds up the counters (SMART, cmd_stats, SGL commands, allocation
bitmap flags), as ``FastPath.run`` does.  What needs Python is scheduled as
a callback of the same loop iteration.

Which SQs go to C, decided anew at every wait (a turn of Python code may
have changed anything): every polled SQ of a controller that can fetch, with
shadow doorbells configured, that the fast path may serve now
(``FastPath.c_batch``), whose CQ belongs to it alone, has interrupts enabled
and no coalescing (Feature 08h 0, or the vector's coalescing disabled with
Feature 09h), and whose vector has a direct eventfd (``direct_fd`` of the
InterruptSink: MSI-X on, unmasked, nothing held back).  If any polled SQ of
a controller does not qualify, that controller's turns run in Python as
before.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from bisect import bisect_right
from typing import TYPE_CHECKING, Any

from cbind import ioq
from emulator import pollloop
from emulator.nvme.cmdstats import LAT_BUCKETS

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.sqpoll import SqPoller
    from emulator.nvme.state import CQState, SQState

log = logging.getLogger("nvme.sqwait")

_FID_COALESCING = 0x08  # Interrupt Coalescing (Base 2.1 §5.1.25.1.8)
_IVC_CD = 1 << 16  # Interrupt Vector Configuration: Coalescing Disable (Feature 09h)


def _env_us(name: str, default: float, unit: int = 1000) -> int:
    """Environment knob ``name`` (a number, default ``default``) times ``unit`` (µs -> ns
    by default); not a finite number of at least 0: the default, with a warning (the C
    waits take unsigned times)."""
    raw = os.environ.get(name)
    if raw is None:
        return int(default * unit)
    try:
        value = float(raw)
        if value < 0:
            raise ValueError("negative")
        return int(value * unit)
    except (ValueError, OverflowError):  # OverflowError: inf
        log.warning("%s=%r is not a number of at least 0; using %s", name, raw, default)
        return int(default * unit)


# Spin this long after the last command seen before napping (0: always nap).  A host
# keeping many commands in flight submits again within it (docs/performance.md).
SPIN_NS = _env_us("NVME_EMU_SQ_SPIN_US", 50)
# A nap between empty turns (in epoll_pwait2: a socket event ends it at once), times the
# commands the last busy turn served, at most NAP_MAX_NS (cbind/sqwait.c).
NAP_NS = _env_us("NVME_EMU_SQ_NAP_US", 50)
NAP_MAX_NS = _env_us("NVME_EMU_SQ_NAP_MAX_US", 200)
# Completions posted while the host still reads ones it was told of may wait for its pass
# to end, at most this long, before their interrupt (cbind/sqwait.c).  0 (the default):
# every turn that posted signals; measured without a clear gain (docs/performance.md).
HOLD_NS = _env_us("NVME_EMU_SQ_HOLD_US", 0)
# The arrival estimate (cbind/sqwait.c): once a host's usual gap between a completion
# that emptied its SQ and its next command is known, nap until this long before the
# next is due, then spin until it comes (or 4 times this long after).  0: off.
EARLY_NS = _env_us("NVME_EMU_SQ_EARLY_US", 20)
# A turn moves at most about this much data before it signals what it posted (the next
# turn goes on at once): the host hears of a 128 KiB command's completion before the
# next command's copy, not after the whole batch's.  0: no limit.
TURN_BYTES = _env_us("NVME_EMU_SQ_TURN_KIB", 64, 1024)
# NVME_EMU_SQ_WAIT=off: the turns stay in Python (comparisons, benchmarks)
ENABLED = os.environ.get("NVME_EMU_SQ_WAIT", "").strip().lower() not in ("off", "0", "no")
_STOP_BASE = ioq.SQW.get("stop_base", 16) if ioq.LIB is not None else 16


class _Planned:
    """One polled SQ handed to C for one wait: its queues and fast-path batch struct, the
    host addresses of its shadow SQ tail and shadow CQ head, its CQ's interrupt eventfd."""
    __slots__ = ("poller", "sq", "cq", "batch", "tail", "shadow_tail", "shadow_head", "irq_fd")

    def __init__(self, poller: "SqPoller", sq: "SQState", cq: "CQState", batch: Any,
                 shadow_tail: int, shadow_head: int, irq_fd: int) -> None:
        self.poller, self.sq, self.cq, self.batch, self.tail = poller, sq, cq, batch, sq.tail
        self.shadow_tail, self.shadow_head, self.irq_fd = shadow_tail, shadow_head, irq_fd


class Hub:
    """The pollers of one event loop whose turns run in C (module text)."""

    def __init__(self, selector: pollloop.WaitingSelector, loop: Any) -> None:
        self.selector = selector
        self.loop = loop
        self.pollers: list["SqPoller"] = []
        # Counters (not state): waits, their outcomes, SQs handed back to Python
        self.waits = self.timeouts = self.events = self.returns = self.served = self.irqs = 0
        self.broken = False  # a failure: never used again (wait)

    def add(self, poller: "SqPoller") -> None:
        if poller not in self.pollers:
            self.pollers.append(poller)
        self.selector.waiter = self.wait

    def remove(self, poller: "SqPoller") -> None:
        if poller in self.pollers:
            self.pollers.remove(poller)

    # -- the waiter ---------------------------------------------------------------
    def wait(self, epfd: int, timeout: float | None) -> bool:
        """The WaitingSelector's waiter.  A failure here (a bug) must not leave polled SQs
        unserved: the hub is given up and every poller goes back to Python turns."""
        try:
            return self._wait(epfd, timeout)
        except Exception:
            log.exception("shadow tail poll turns in C failed; they run in Python from now on")
            self.broken = True
            self.selector.waiter = None
            for p in self.pollers:
                p.python_turn()
            self.pollers.clear()
            return True

    def _wait(self, epfd: int, timeout: float | None) -> bool:
        plan: list[_Planned] = []
        turns = False  # Python turns scheduled: callbacks of this iteration, select must not block
        for p in list(self.pollers):
            got = _plan(p) if p.polled else None
            if got is None:  # nothing polled, or not for C now: Python's turns (sqpoll)
                self.remove(p)
                p.python_turn()
                turns = True
                timeout = 0  # that turn is a callback of this loop iteration: one C turn only
                continue
            plan.extend(got)
        if not self.pollers:
            self.selector.waiter = None
        if not plan:
            return turns
        entries = ioq.FFI.new("struct sqw_entry[]", len(plan))
        for i, pl in enumerate(plan):
            _fill(entries[i], pl)
        t = -1 if timeout is None else max(0, int(timeout * 1e9))
        self.waits += 1
        rc = ioq.LIB.sqw_wait(entries, len(plan), epfd, t, SPIN_NS, NAP_NS, NAP_MAX_NS, HOLD_NS,
                                 EARLY_NS)
        if rc == 0:
            self.timeouts += 1
        elif rc == 1:
            self.events += 1
        for i, pl in enumerate(plan):
            self._sync(entries[i], pl)
        return True

    def _sync(self, e: Any, pl: _Planned) -> None:
        """Copy back what C did to the queues of ``pl``; schedule what needs Python."""
        sq, cq, p = pl.sq, pl.cq, pl.poller
        ctrl = p.ctrl
        sq.tail, sq.head = e.sq_tail, e.sq_head
        cq.head, cq.tail, cq.phase = e.cq_head, e.cq_tail, e.cq_phase
        if sq.tail != pl.tail:
            p.found += (sq.tail - pl.tail) % sq.size
            p.seen[sq.qid] = sq.tail
        if sq.qid in p.polled:
            p.polled[sq.qid] = e.last_ns
        # the arrival estimate; when the SQ emptied only while C keeps it (see _fill)
        p.arrival[sq.qid] = (e.empty_ns if not e.stop else 0, e.gap_ns, sq.tail)
        self.irqs += e.irqs
        done = e.done
        if done:
            fast = ctrl.fast
            writes = e.writes
            fast._account(cq, done - writes, writes, e.read_bytes, e.write_bytes, 0, e.sgls)
            latency = ctrl.cmd_stats.io.latency
            for b, n in enumerate(ioq.FFI.unpack(e.lat, LAT_BUCKETS)):
                if n:
                    latency[b] += n
            if writes and fast.c is not None:
                fast.c.bitmap_flags()  # a bitmap written through, or a write-through failed
            if not fast.completed["c"]:
                log.info("ctrl %d: I/O fast path (c) serves Reads and Writes from the shadow SQ "
                         "tail poller", ctrl.cntlid)
            fast.completed["c"] += done
            self.served += done
        if e.signaled != e.cq_tail:  # completions C held: Python signals them now
            ctrl.note_posted(cq.qid, (e.cq_tail - e.signaled) % cq.size)
            ctrl.flush_interrupts()
        if e.stop:
            self.returns += 1
            idle = e.stop < _STOP_BASE  # idle spell over, or a shadow value out of range
            self.loop.call_soon(p.c_returned, sq, idle)


def _plan(p: "SqPoller") -> list[_Planned] | None:
    """The polled SQs of ``p`` for C, or None if one of them is not for C now."""
    ctrl = p.ctrl
    cfg = p.shadow()
    if not ctrl.can_fetch() or cfg is None or p.clock is not time.monotonic_ns:
        return None  # (a test's clock: C keeps CLOCK_MONOTONIC, as time.monotonic_ns)
    if ctrl._irq_due:
        ctrl.flush_interrupts()  # C fires only what it posts itself
    coalesce = ctrl.state.features.get(_FID_COALESCING, 0)
    direct = getattr(ctrl.irq, "direct_fd", None)
    if direct is None:
        return None
    out = []
    for qid in p.polled:
        sq = ctrl.sqs.get(qid)
        if sq is None:
            return None
        got = ctrl.fast.c_batch(sq)
        if got is None:
            return None
        cq = got[1]
        if not cq.ien or (coalesce and not ctrl.state.ivc.get(cq.iv, 0) & _IVC_CD):
            return None
        if sum(1 for s in ctrl.sqs.values() if s.cqid == cq.qid) != 1:
            return None  # a CQ shared with another SQ: its tail would have two owners
        fd = direct(cq.iv)
        regions = ctrl.fast.regions  # (the table c_batch just used)
        tail = _host(regions, cfg[0] + 8 * sq.qid)  # stride 4 << CAP.DSTRD, DSTRD 0 (dbbuf.py)
        head = _host(regions, cfg[0] + 8 * cq.qid + 4)
        if fd is None or tail is None or head is None:
            return None  # no direct eventfd, or a shadow buffer outside the direct regions
        out.append(_Planned(p, sq, cq, got[0], tail, head, fd))
    return out


def _host(regions: Any, addr: int) -> int | None:
    """Host address of the 4 bytes at IOVA ``addr`` inside one direct region, or None."""
    i = bisect_right(regions.starts, addr) - 1
    if i < 0 or addr + 4 > regions.ends[i] or regions.ctable is None:
        return None
    return int(regions.ctable[i].host) + addr - regions.starts[i]


def _fill(e: Any, pl: _Planned) -> None:
    sq, cq = pl.sq, pl.cq
    e.b = pl.batch
    e.shadow_tail, e.shadow_head, e.irq_fd = pl.shadow_tail, pl.shadow_head, pl.irq_fd
    e.sq_head, e.sq_tail, e.cq_head, e.cq_tail, e.cq_phase = sq.head, sq.tail, cq.head, cq.tail, cq.phase
    e.signaled = cq.tail  # Python signalled what it posted (_plan flushed)
    e.last_ns = min(pl.poller.polled.get(sq.qid, 0), time.monotonic_ns())
    e.idle_ns = pl.poller.idle_ns
    e.turn_bytes = TURN_BYTES
    empty, gap, tail = pl.poller.arrival.get(sq.qid, (0, 0, -1))
    e.gap_ns = gap
    # when a turn of C left the SQ empty: only if nothing has happened to it since
    e.empty_ns = empty if tail == sq.tail and sq.head == sq.tail else 0


_hubs: "weakref.WeakKeyDictionary[Any, Hub]" = weakref.WeakKeyDictionary()


def hub(ctrl: "Controller") -> Hub | None:
    """The Hub of the controller's event loop, if its turns can run in C at all."""
    if ioq.LIB is None or not ENABLED:
        return None
    loop = ctrl.scheduler
    sel = pollloop.waiting_selector(loop)
    if sel is None:
        return None
    h = _hubs.get(loop)
    if h is None:
        h = _hubs[loop] = Hub(sel, loop)
    return None if h.broken else h
