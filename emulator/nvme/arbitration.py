"""Bounded work per event-loop turn: round-robin arbitration over the SQs with work.

One event loop serves every controller of the process, so one controller's
legal but heavy load (a doorbell releasing thousands of large reads) must not
hold it.  SQs with work take turns, ``ARB_BURST`` commands each per round
(Base 2.1 §3.4.4, Round Robin arbitration, with an Arbitration Burst of 8).
A pass gives the loop back after ``TURN_COMMANDS`` commands or
``TURN_SECONDS`` and continues in a later loop turn; a doorbell that arrives
while a continuation is due only marks its SQ ready, so a controller runs at
most one pass per loop turn however many doorbells its host rings.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller

ARB_BURST = 8
TURN_COMMANDS = 64
TURN_SECONDS = 0.005


class Arbiter:
    """The SQs of one controller that have work, and its pass state (none of it persistent)."""

    def __init__(self, ctrl: "Controller") -> None:
        self.ctrl = ctrl
        self._ready: dict[int, None] = {}  # SQ ids with work, in round-robin order
        self._in_pass = False
        self._scheduled = False

    def ready(self, qid: int) -> None:
        """SQ ``qid`` may have work: run a pass now unless one runs or is due."""
        self._ready[qid] = None
        if not self._in_pass and not self._scheduled:
            self._pass()

    def clear(self) -> None:
        self._ready.clear()

    def _pass(self) -> None:
        ctrl = self.ctrl
        self._scheduled = False
        self._in_pass = True
        budget, deadline = TURN_COMMANDS, time.monotonic() + TURN_SECONDS
        try:
            while self._ready and budget > 0 and time.monotonic() < deadline:
                for qid in list(self._ready):
                    sq = ctrl.sqs.get(qid)
                    done, more = ctrl.run_sq(sq, min(ARB_BURST, budget)) if sq is not None else (0, False)
                    budget -= done
                    if not more:
                        self._ready.pop(qid, None)
                    if budget <= 0 or time.monotonic() >= deadline:
                        break
        finally:
            self._in_pass = False
        if self._ready and not self._scheduled and ctrl.scheduler is not None:
            self._scheduled = True
            ctrl.scheduler.call_soon(self._continue)

    def _continue(self) -> None:
        if self._scheduled:
            self._pass()
            self.ctrl.flush_interrupts()
