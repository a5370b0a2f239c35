"""TP4159 state across a Controller Level Reset (Base 2.1 §3.7.2 with §8.1.12)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.nvme.migration import memtrack, send, udlog
from emulator.nvme.migration.model import MMC_KEY, mmc_state, target_state

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller


def on_reset(ctrl: "Controller") -> None:
    """Controller Level Reset (Base §3.7.2 with §8.1.12 [8.1.13])."""
    if ctrl.config.is_mmc:
        if MMC_KEY not in ctrl.state.vendor:
            return
        # The MMC's CDQs are deleted and the tracking it performs stops.
        udlog.stop_all(ctrl)
        memtrack.stop_all(ctrl)
        mmc_state(ctrl).sequences.clear()
        # "remains suspended until ... a Controller Level Reset occurs on the
        # controller processing this command" (Figure 351 text): the MMC's.
        for other in ctrl.subsystem.controllers.values():
            if other is not ctrl and other.state.suspended \
                    and target_state(other).suspended_by == ctrl.cntlid:
                send.wake(other)
        return
    # A CLR of the migratable controller itself ends its suspended state
    # (controller_level_reset clears state.suspended); forget who did it.
    ts = target_state(ctrl)
    ts.suspended_by = -1
    ts.suspended_at = []


def host_gone(ctrl: "Controller") -> None:
    """An MMC whose host goes away (its memory is detached: the vfio-user client
    disconnected or died) gets a function reset, so the CDQs, logging and memory
    tracking it ran stop and the controllers it suspended resume
    (docs/live-migration.md, "When the MMH dies")."""
    if ctrl.config.is_mmc and ctrl.memory is None and ctrl.ready:
        ctrl.function_reset()
