"""Track Send (3Dh), Base 2.1 §5.1.27 [2.3 §5.2.28]: SEL 0h Log User Data
Changes (``udlog``), SEL 1h Track Memory Changes (``memtrack``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.nvme.migration import memtrack, udlog, wire
from emulator.nvme.spec import Command, invalid_field
from emulator.nvme.tables import Result

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller


def track_send(ctrl: "Controller", cmd: Command) -> Result:
    select = wire.sel(cmd.cdw10)
    if (cmd.cdw10 >> 8) & 0xFF:
        raise invalid_field("CDW10 15:8 reserved")
    if select == wire.TRACK_SEL_LUDC:
        return udlog.track_send_ludc(ctrl, cmd)
    if select == wire.TRACK_SEL_TMC:
        return memtrack.track_send_tmc(ctrl, cmd)
    raise invalid_field(f"Track Send SEL {select:#x} reserved")
