"""Asynchronous Event Request (Base 2.1 §5.1.2) and event delivery."""
from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.nvme.spec import (
    AET_ERROR, AET_NOTICE, AET_ONE_SHOT, AET_SMART, AdminOpcode, CommandSpecific, Command, specific,
)

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller

from emulator.nvme.controller import Result, admin_command

AERL = 3  # Identify Controller AERL: 4 outstanding requests (0's based)

__all__ = ["AET_ERROR", "AET_SMART", "AET_NOTICE", "AET_ONE_SHOT", "post_event", "deliver",
           "clear_type"]


@admin_command(AdminOpcode.ASYNC_EVENT_REQUEST)
def async_event_request(ctrl: "Controller", cmd: Command) -> Result:
    aer = ctrl.state.aer
    if len(aer.outstanding) > AERL:
        raise specific(CommandSpecific.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED)
    aer.outstanding.append(cmd.cid)
    deliver(ctrl)  # an event may already be waiting
    return None  # held until an event occurs


def post_event(ctrl: "Controller", aet: int, aei: int, lid: int, dw1: int = 0) -> None:
    """Queue an event; it completes an outstanding AER when one is available.

    One-shot events (AET 100b) are reported once and not masked; the other
    types are masked after reporting until the host reads the log page with
    RAE=0 (§5.1.2).
    """
    dw0 = (aet & 0x7) | ((aei & 0xFF) << 8) | ((lid & 0xFF) << 16)
    ctrl.state.aer.pending.append([dw0, dw1])
    deliver(ctrl)
    ctrl.flush_interrupts()


def deliver(ctrl: "Controller") -> None:
    aer = ctrl.state.aer
    if not ctrl.can_fetch():
        return
    i = 0
    while aer.outstanding and i < len(aer.pending):
        dw0, dw1 = aer.pending[i]
        aet = dw0 & 0x7
        if aet != AET_ONE_SHOT and aet in aer.masked_types:
            i += 1
            continue
        cq = ctrl.cqs.get(0)
        if cq is None or not ctrl.cq_room(cq):
            return  # admin CQ full: the event waits (CQ head doorbell -> kick)
        cid = aer.outstanding[0]
        ctrl.complete(0, cid, 0, dw0, dw1)
        aer.outstanding.pop(0)
        aer.pending.pop(i)
        if aet != AET_ONE_SHOT:
            aer.masked_types.append(aet)


def clear_type(ctrl: "Controller", aet: int) -> None:
    """A Get Log Page with RAE=0 re-enables reporting of this event type."""
    aer = ctrl.state.aer
    if aet in aer.masked_types:
        aer.masked_types.remove(aet)
        deliver(ctrl)
