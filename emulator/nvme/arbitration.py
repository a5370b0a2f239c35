"""Bounded work per event-loop turn: round-robin arbitration over the SQs with work.

One event loop serves every controller of the process, so one controller's
legal but heavy load (a doorbell releasing thousands of large reads) must not
hold it.  SQs with work take turns, ``ARB_BURST`` commands each per round
(Base 2.1 §3.4.4, Round Robin arbitration, with an Arbitration Burst of 8).
A pass gives the loop back after ``TURN_COMMANDS`` commands, ``TURN_BYTES``
bytes of data transfer or ``TURN_SECONDS``, and continues in a later loop
turn; a doorbell that arrives while a continuation is due only marks its SQ
ready, so a controller runs at most one pass per loop turn however many
doorbells its host rings.

Bytes count as well as commands: eight 4 MiB reads are 32 MiB of copying.
A burst is cut to the number of commands that fit the bytes left in the
pass, estimated from the SQ's last burst (``Controller.xfer_bytes`` counts
the data each command maps), so an SQ of large transfers runs one command
per burst and the pass ends once ``TURN_BYTES`` have moved.  ``run_sq``
itself only knows a command limit: a command is never split, and the
estimate can be wrong by one burst when an SQ changes from small to large
transfers (at most ``ARB_BURST`` commands of MDTS bytes).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.state import SQState

ARB_BURST = 8
TURN_COMMANDS = 64
TURN_BYTES = 4 << 20
TURN_SECONDS = 0.005


class Arbiter:
    """The SQs of one controller that have work, and its pass state (none of it persistent)."""

    def __init__(self, ctrl: "Controller") -> None:
        self.ctrl = ctrl
        self._ready: dict[int, None] = {}  # SQ ids with work, in round-robin order
        self._per_command: dict[int, int] = {}  # SQ id -> bytes per command of its last burst
        self._in_pass = False
        self._scheduled = False

    def ready(self, qid: int) -> None:
        """SQ ``qid`` may have work: run a pass now unless one runs or is due."""
        if self._in_pass or self._scheduled or self._ready:
            self._ready[qid] = None
            if not self._in_pass and not self._scheduled:
                self._pass()
            return
        # Only this SQ has work and no pass runs or is due: the pass's first burst,
        # inline (a doorbell at low queue depth); the rest of the pass as usual.
        sq = self.ctrl.sqs.get(qid)
        if sq is None:
            return
        self._in_pass = True
        self._ready[qid] = None  # (as in a pass: still listed if run_sq raises)
        deadline = time.monotonic() + TURN_SECONDS
        try:
            done, moved = self._run_burst(qid, sq, TURN_COMMANDS, TURN_BYTES)
            if self._ready:
                self._rounds(TURN_COMMANDS - done, TURN_BYTES - moved, deadline)
        finally:
            self._in_pass = False
        if self._ready:
            self._schedule()

    def clear(self) -> None:
        self._ready.clear()
        self._per_command.clear()

    def _burst(self, qid: int, commands: int, nbytes: int) -> int:
        """Commands SQ ``qid`` may run now: ``commands`` at most, and what ``nbytes`` allow."""
        per = self._per_command.get(qid, TURN_BYTES)  # unknown SQ: one command to learn its size
        return max(1, min(ARB_BURST, commands, nbytes // per if per else ARB_BURST))

    def _pass(self) -> None:
        self._scheduled = False
        self._in_pass = True
        try:
            self._rounds(TURN_COMMANDS, TURN_BYTES, time.monotonic() + TURN_SECONDS)
        finally:
            self._in_pass = False
        self._schedule()

    def _rounds(self, commands: int, nbytes: int, deadline: float) -> None:
        """Bursts round robin over the ready SQs until none is left or the budget is spent."""
        ctrl = self.ctrl
        while self._ready and commands > 0 and nbytes > 0 and time.monotonic() < deadline:
            for qid in list(self._ready):
                sq = ctrl.sqs.get(qid)
                if sq is None:
                    self._ready.pop(qid, None)
                    continue
                done, moved = self._run_burst(qid, sq, commands, nbytes)
                commands -= done
                nbytes -= moved
                if commands <= 0 or nbytes <= 0 or time.monotonic() >= deadline:
                    break

    def _run_burst(self, qid: int, sq: "SQState", commands: int, nbytes: int) -> tuple[int, int]:
        """One burst of SQ ``qid`` within the budget left: (commands run, bytes moved).
        It learns the SQ's bytes per command and moves the SQ to the end of the ready list
        if it has more (the next burst is the next SQ's), or drops it."""
        ctrl = self.ctrl
        x0 = ctrl.xfer_bytes
        done, more = ctrl.run_sq(sq, self._burst(qid, commands, nbytes))
        moved = ctrl.xfer_bytes - x0
        if done:
            self._per_command[qid] = moved // done
        self._ready.pop(qid, None)
        if more:
            self._ready[qid] = None
        return done, moved

    def _schedule(self) -> None:
        """SQs left with work: the pass continues in a later loop turn."""
        ctrl = self.ctrl
        if self._ready and not self._scheduled and ctrl.scheduler is not None:
            self._scheduled = True
            ctrl.scheduler.call_soon(self._continue)

    def _continue(self) -> None:
        if self._scheduled:
            self._pass()
            self.ctrl.flush_interrupts()
