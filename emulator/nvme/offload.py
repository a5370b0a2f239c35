"""Long file operations off the event loop (punch hole, fdatasync): a worker thread runs
them, the command is held, and its completion is posted back on the loop.

One event loop serves every controller of the process, so a Dataset Management
deallocating a terabyte of scattered extents, a Sanitize or a Flush on a slow
disk would stall every other controller for seconds.  ``offload`` hands the
blocking part (``work``, file-only system calls: no controller state, no guest
memory) to the loop's default executor; ``then`` runs on the loop with the
result (bitmap updates, notifications) and the command completes with the
usual status mapping.  A Controller Level Reset while the work runs drops the
completion (the queues it belonged to are gone).  Without an executor (a
controller without a scheduler, as in direct tests) both run at once.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from emulator.nvme.spec import Command

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller, Result

T = TypeVar("T")


def offload(ctrl: "Controller", cmd: Command, work: Callable[[], T],
            then: Callable[[T], "Result"]) -> "Result":
    """Run ``work()`` on a worker thread, then ``then(value)`` on the loop; returns None (held)."""
    run = getattr(ctrl.scheduler, "run_in_executor", None)
    if run is None:
        return then(work())
    resets = ctrl.resets
    fut: Future[Any] = run(None, work)
    fut.add_done_callback(lambda f: _done(ctrl, cmd, resets, f, then))
    return None


def _done(ctrl: "Controller", cmd: Command, resets: int, fut: Future[Any], then: Callable[[Any], "Result"]) -> None:
    if ctrl.resets != resets:
        return  # the controller was reset meanwhile: no queue to complete on
    dw0 = dw1 = 0
    try:
        result = then(fut.result())
        if result is not None:
            dw0, dw1 = result
        status = 0
    except Exception as e:  # noqa: BLE001 - mapped to the command's status
        status, dw0, dw1 = ctrl.failure(cmd, e)
    ctrl.complete(cmd.sqid, cmd.cid, status, dw0, dw1)
    ctrl.flush_interrupts()
