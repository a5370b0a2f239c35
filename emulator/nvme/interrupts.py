"""The controller's interrupts: pending counts per CQ, coalescing, INTMS/INTMC.

``Controller`` inherits these methods (``Interrupts`` is one of its bases, not an
object of its own), so ``ctrl.flush_interrupts()`` costs no call more than a method
defined in emulator/nvme/controller.py: the doorbell path calls it after every
doorbell, and with no CQ pending it is one attribute check.  What posts CQEs
(``Controller.post_held``, the I/O fast path) counts them with ``note_posted``;
``flush_interrupts`` decides what to signal through the controller's InterruptSink:
at once, or after the aggregation time or threshold of Interrupt Coalescing (FID
08h) unless the vector's Interrupt Vector Configuration (FID 09h) disables
coalescing (the admin CQ is never coalesced).  With MSI-X off, a vector masked by INTMS is held until
INTMC unmasks it (Base 2.1 §3.1.4.3, §3.1.4.4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from emulator.nvme.interfaces import InterruptSink, Scheduler, TimerHandle
from emulator.nvme.spec import FID
from emulator.nvme.state import ControllerState, CQState

_FID_COALESCING = int(FID.INTERRUPT_COALESCING)


@dataclass
class _IrqState:
    pending: int = 0  # CQEs posted since the last interrupt
    timer: Optional[TimerHandle] = None


class Interrupts:
    """The interrupt methods of Controller, and the state only they keep."""

    # of the Controller, set by its constructor
    state: ControllerState
    cqs: dict[int, CQState]
    irq: InterruptSink | None
    scheduler: Scheduler | None

    def __init__(self) -> None:
        self._irq: dict[int, _IrqState] = {}
        self._irq_due = False  # some _IrqState may have a pending count (flush_interrupts has work)
        self._intx_pending = 0  # vectors masked by INTMS when they fired (a bit per vector)

    def drop_interrupts(self) -> None:
        """Forget every pending count and coalescing timer (a Controller Level Reset)."""
        for st in self._irq.values():
            if st.timer:
                st.timer.cancel()
        self._irq.clear()

    def note_posted(self, cqid: int, posted: int) -> None:
        """``posted`` CQEs went into CQ ``cqid``: flush_interrupts decides what to fire."""
        st = self._irq.get(cqid)  # (no _IrqState made just to be thrown away: once per doorbell)
        if st is None:
            st = self._irq[cqid] = _IrqState()
        st.pending += posted
        self._irq_due = True

    def flush_interrupts(self) -> None:
        """Signal the vectors of CQs that got entries, honouring coalescing (FID 08h/09h)."""
        if not self._irq_due:
            return  # no CQ has a pending count: nothing to decide
        self._irq_due = due = False
        coalesce = self.state.features.get(_FID_COALESCING, 0)
        thr, atime = (coalesce & 0xFF) + 1, (coalesce >> 8) & 0xFF
        for cqid, st in self._irq.items():
            if not st.pending:
                continue
            cq = self.cqs.get(cqid)
            if cq is None:
                st.pending = 0
                continue
            if not cq.ien:
                st.pending = 0
                continue
            disabled = cqid == 0 or bool(self.state.ivc.get(cq.iv, 0) & (1 << 16))
            if disabled or coalesce == 0 or st.pending >= thr or self.scheduler is None:
                self._fire(cq.iv)
                st.pending = 0
                if st.timer:
                    st.timer.cancel()
                    st.timer = None
            else:
                due = True  # still pending: decided again at the next flush
                if st.timer is None:
                    st.timer = self.scheduler.call_later(atime * 100e-6, self._coalesce_timeout, cqid)
        if due:
            self._irq_due = True

    def rearm_interrupts(self) -> None:
        """Signal every CQ holding entries the host has not consumed (TP4159 Resume)."""
        for cq in self.cqs.values():
            if cq.tail != cq.head:
                self._irq.setdefault(cq.qid, _IrqState()).pending += 1
                self._irq_due = True
        self.flush_interrupts()

    def _coalesce_timeout(self, cqid: int) -> None:
        st = self._irq.get(cqid)
        cq = self.cqs.get(cqid)
        if st is None:
            return
        st.timer = None
        if st.pending and cq is not None:
            st.pending = 0
            self._fire(cq.iv)

    def _fire(self, vector: int) -> None:
        if self.irq is None or self.state.suspended:
            return
        if self.state.regs.intms & (1 << vector) and not self.irq.msix_enabled():
            self._intx_pending |= 1 << vector  # masked by INTMS: hold it
            return
        self.irq.fire(vector)

    def _unmasked(self, bits: int) -> None:
        due = self._intx_pending & bits
        self._intx_pending &= ~bits
        v = 0
        while due:
            if due & 1:
                self._fire(v)
            due >>= 1
            v += 1
