"""Migration Receive (42h), Base 2.1 §5.1.16 [2.3 §5.2.16]: Get Controller State.

CDW10: SEL 7:0 (0h), MOS 7:0 = CSVI.  CDW11: CNTLID 15:0, CSUUIDI 23:16,
CSUIDXP 31:24 (vendor parameter, unused by our format).  CDW12/13: byte
offset (bits 1:0 zero).  CDW15: NUMDL, 0's based.  DW0 bit 0 CSUP.

(nvme-cli's help text labels CNTLID "CDW10[31:16]" and CSVI "CDW11[7:0]";
libnvme encodes as above, which is the spec.)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.nvme.migration import ctrlstate, wire
from emulator.nvme.migration.targets import migratable
from emulator.nvme.spec import Command, invalid_field
from emulator.nvme.tables import Result

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller


def migration_receive(ctrl: "Controller", cmd: Command) -> Result:
    select = wire.sel(cmd.cdw10)
    if select != wire.MIGRATION_RECEIVE_GET_STATE:
        raise invalid_field(f"Migration Receive SEL {select:#x} reserved")
    if wire.mos(cmd.cdw10) >> 8 or (cmd.cdw10 >> 8) & 0xFF:
        raise invalid_field("reserved bits of CDW10 set")
    csvi = wire.mos(cmd.cdw10) & 0xFF
    cntlid, csuuidi = cmd.cdw11 & 0xFFFF, (cmd.cdw11 >> 16) & 0xFF
    offset = wire.offset64(cmd.cdw12, cmd.cdw13)
    length = (cmd.cdw15 + 1) * 4  # NUMDL, 0's based
    target = migratable(ctrl, cntlid)  # 1Fh
    ctrlstate.check_indices(csvi, csuuidi)
    if offset & 0x3:
        raise invalid_field("offset not dword aligned")
    if length > ctrl.max_transfer:
        raise invalid_field("transfer exceeds MDTS")
    suspended = target.state.suspended  # constant during the command (one thread)
    data = ctrlstate.build(target, csvi, csuuidi)
    if offset > len(data):
        raise invalid_field(f"offset {offset} beyond the {len(data)}-byte Controller State")
    ctrl.data_to_host(cmd, data[offset:offset + length], length)
    return (wire.CSUP if suspended and target.state.suspended else 0), 0
