"""Long file operations off the event loop (punch hole, fdatasync): a worker thread runs
them, the command is held, and its completion is posted back on the loop.

One event loop serves every controller of the process, so a Dataset Management
deallocating a terabyte of scattered extents, a Sanitize or a Flush on a slow
disk would stall every other controller for seconds.  ``offload`` hands the
blocking part (``work``, file-only system calls: no controller state, no guest
memory) to a small worker pool; ``then`` runs on the loop with the result
(bitmap updates, notifications) and the command completes with the usual
status mapping.  A Controller Level Reset while the work runs drops the
completion (the queues it belonged to are gone), but ``then`` still runs: the
files have changed and the bookkeeping must follow them.  :func:`drain` waits for a
controller's offloaded commands and completes them at once: TP4159 Suspend
needs every fetched command complete before the controller is suspended.
Without a thread-safe scheduler (a controller without a loop, as in direct
tests) both parts run at once.
"""
from __future__ import annotations

import logging
import threading
import weakref
from time import perf_counter_ns
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from emulator.nvme.spec import Command

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.tables import Result

T = TypeVar("T")
log = logging.getLogger("nvme.offload")

_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nvme-offload")
_inflight: "weakref.WeakKeyDictionary[Controller, set[_Job]]" = weakref.WeakKeyDictionary()


class _Job:
    def __init__(self, ctrl: "Controller", cmd: Command, then: Callable[[Any], "Result"]) -> None:
        self.ctrl, self.cmd, self.then = ctrl, cmd, then
        self.resets = ctrl.resets
        self.future: Future[Any] | None = None
        self.finished = False
        self.t0, self.nbytes = ctrl.cmd_t0, ctrl.xfer_bytes - ctrl.cmd_x0  # for cmd_stats

    def finish(self) -> None:
        """On the loop: complete the command (once)."""
        if self.finished:
            return
        self.finished = True
        ctrl = self.ctrl
        _inflight.get(ctrl, set()).discard(self)
        assert self.future is not None
        reset = ctrl.resets != self.resets
        dw0 = dw1 = 0
        try:
            # Even after a reset: the files changed, so the bookkeeping (bitmaps, logs) follows.
            result = self.then(self.future.result())
            if result is not None:
                dw0, dw1 = result
            status = 0
        except Exception as e:  # noqa: BLE001 - mapped to the command's status
            if reset:
                log.error("ctrl %d: offloaded opcode %#x failed after a reset", ctrl.cntlid,
                          self.cmd.opc, exc_info=e)
                return
            status, dw0, dw1 = ctrl.failure(self.cmd, e)
        if reset:
            return  # the controller was reset meanwhile: no queue to complete on
        ctrl.complete(self.cmd.sqid, self.cmd.cid, status, dw0, dw1)
        ctrl.cmd_stats.record(self.cmd.sqid, self.cmd.opc, status, self.nbytes, perf_counter_ns() - self.t0)
        ctrl.flush_interrupts()


def offload(ctrl: "Controller", cmd: Command, work: Callable[[], T],
            then: Callable[[T], "Result"]) -> "Result":
    """Run ``work()`` on a worker thread, then ``then(value)`` on the loop; returns None (held)."""
    post = getattr(ctrl.scheduler, "call_soon_threadsafe", None)
    if post is None:
        return then(work())
    job = _Job(ctrl, cmd, then)
    _inflight.setdefault(ctrl, set()).add(job)
    job.future = _pool.submit(work)
    job.future.add_done_callback(lambda _: post(job.finish))
    return None


class _SharedSync:
    """Flushes of one controller waiting for the same kind of work: one worker job syncs the
    union of their files.  A Flush joins only while the job has not started, so the sync
    begins after the Flush was submitted and covers every write completed before it
    (NVM CS 1.2 §3.3.1 Flush)."""

    def __init__(self, sync: Callable[[list[int]], None]) -> None:
        self.sync = sync
        self.fds: dict[int, None] = {}
        self.jobs: list[_Job] = []
        self.started = False
        self.future: Future[Any] | None = None

    def run(self) -> None:  # on a worker thread
        with _lock:
            self.started = True
            fds = list(self.fds)
        self.sync(fds)

    def finish(self) -> None:  # on the loop
        for job in self.jobs:
            job.finish()


_lock = threading.Lock()
_shared: "weakref.WeakKeyDictionary[Controller, _SharedSync]" = weakref.WeakKeyDictionary()


def sync_shared(ctrl: "Controller", cmd: Command, fds: list[int],
                sync: Callable[[list[int]], None]) -> "Result":
    """Run ``sync(fds)`` for ``cmd`` on a worker thread, shared with the controller's other
    commands that arrive before it starts (a doorbell releasing a thousand Flushes costs a
    few fdatasyncs and worker jobs, not a thousand); returns None (held)."""
    post = getattr(ctrl.scheduler, "call_soon_threadsafe", None)
    if post is None:
        sync(fds)
        return 0, 0
    job = _Job(ctrl, cmd, lambda _: (0, 0))
    _inflight.setdefault(ctrl, set()).add(job)
    with _lock:
        batch = _shared.get(ctrl)
        fresh = batch is None or batch.started or batch.sync is not sync
        if fresh:
            batch = _shared[ctrl] = _SharedSync(sync)
        assert batch is not None
        batch.fds.update(dict.fromkeys(fds))
        batch.jobs.append(job)
    if fresh:
        batch.future = _pool.submit(batch.run)
        done = batch.finish
        batch.future.add_done_callback(lambda _: post(done))
    job.future = batch.future
    return None


def drain(ctrl: "Controller") -> None:
    """Wait for ``ctrl``'s offloaded commands (blocking the loop) and complete them now."""
    for job in list(_inflight.get(ctrl, ())):
        assert job.future is not None
        job.future.exception()  # waits; the outcome is taken by finish()
        job.finish()


def wait_idle() -> None:
    """Wait until no offloaded work runs (before closing the files it uses)."""
    for jobs in list(_inflight.values()):
        for job in list(jobs):
            if job.future is not None:
                job.future.exception()
