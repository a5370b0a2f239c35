"""Who may issue TP4159 commands and at whom.

- The privileged commands (Controller Data Queue, Track Send/Receive,
  Migration Send/Receive) exist on Migration Management Controllers only:
  a migratable controller "shall not support" Migration Send/Receive, Identify
  CNS 20h or CDQ create of a User Data Migration Queue (Base 2.1 §8.1.12
  [2.3 §8.1.13]); nvme-emu supports no other CDQ type and no tracking on
  migratable controllers either, so every one of those opcodes is Invalid
  Opcode there.
- A command that names a CNTLID which is not a migratable controller of the
  subsystem (unknown, the MMC itself, another MMC) is aborted with Invalid
  Controller Identifier (1Fh).  The spec gives that status for CDQ create,
  Track Send/TMC (CNTLID = self), Track Receive and Migration Send/Receive;
  for Suspend/Resume of an unknown controller no sentence was found and 1Fh
  is the natural reading.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from emulator.nvme.controller import ADMIN_AVAILABLE, Handler, admin_command
from emulator.nvme.spec import CommandSpecific, specific

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller


def is_mmc(ctrl: "Controller") -> bool:
    return ctrl.config.is_mmc


def mmc_command(opcode: int) -> Callable[[Handler], Handler]:
    """Register an admin command that only an MMC supports."""
    def deco(fn: Handler) -> Handler:
        ADMIN_AVAILABLE[opcode] = is_mmc
        return admin_command(opcode)(fn)
    return deco


def migratable(mmc: "Controller", cntlid: int) -> "Controller":
    """The migratable controller ``cntlid`` of the MMC's subsystem, or 1Fh."""
    target = mmc.subsystem.controllers.get(cntlid)
    if target is None or target is mmc or target.config.is_mmc:
        raise specific(CommandSpecific.INVALID_CONTROLLER_IDENTIFIER,
                       f"CNTLID {cntlid:#x} is not a migratable controller")
    return target


def mmcs(ctrl: "Controller") -> list["Controller"]:
    """Every MMC of the controller's subsystem."""
    return [c for c in ctrl.subsystem.controllers.values() if c.config.is_mmc]


def any_suspended(ctrl: "Controller") -> bool:
    return any(c.state.suspended for c in ctrl.subsystem.controllers.values())
