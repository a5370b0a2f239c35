"""NVMe host-managed live migration, TP4159 (NVMe Base 2.1 / 2.3, NVM CS 1.2).

A Migration Management Controller (ControllerConfig.kind == "mmc") reports
OACS.HMLMS and executes the privileged commands on behalf of the migratable
controllers of its subsystem:

- ``cdq``       Controller Data Queue 45h, Feature 21h, One-Shot CDQ events
- ``udlog``     Track Send SEL 0h: the LBA Migration Queue (NVM CS §5.6)
- ``memtrack``  Track Send SEL 1h, Track Receive 3Eh: host memory dirty tracking
- ``track``     Track Send 3Dh dispatch
- ``send``      Migration Send 41h: Suspend, Resume, Set Controller State
- ``receive``   Migration Receive 42h: Get Controller State
- ``ctrlstate`` the Controller State data structure (NVMe-defined v0 + ours)
- ``identify_lm`` Identify Controller fields, LBAMQF, CNS 20h
- ``wire``      every layout and code point, declared once
- ``model``     the plain serialisable state in ControllerState.vendor

Reference and choices among sources: docs/tp4159.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.nvme.controller import CONTROLLER_HOOKS
from emulator.nvme.migration import (  # noqa: F401  (registration)
    cdq, ctrlstate, identify_lm, memtrack, receive, send, track, udlog,
)
from emulator.nvme.migration.model import MMC_KEY, mmc_state, target_state

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller


def _on_reset(ctrl: "Controller") -> None:
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
    ts.suspended_by = ts.notified_by = -1
    ts.suspended_at = []


def _host_gone(ctrl: "Controller") -> None:
    """An MMC whose host goes away (its memory is detached: the vfio-user client
    disconnected or died) gets a function reset, so the CDQs, logging and memory
    tracking it ran stop and the controllers it suspended resume
    (docs/live-migration.md, "When the MMH dies")."""
    if ctrl.config.is_mmc and ctrl.memory is None and ctrl.ready:
        ctrl.function_reset()


def _install(ctrl: "Controller") -> None:
    ctrl.observers.on_write.append(udlog.on_write)
    ctrl.observers.on_reset.append(_on_reset)
    ctrl.observers.on_memory.append(memtrack.on_memory)
    ctrl.observers.on_memory.append(_host_gone)


CONTROLLER_HOOKS.append(_install)
