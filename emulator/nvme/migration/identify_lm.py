"""TP4159 in Identify (Base 2.1 §5.1.13): the MMC's Identify Controller
fields, the NVM Identify Controller LBAMQF, and CNS 20h."""
from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.nvme.identify import CTRL_PATCHERS, NVM_CTRL_PATCHERS, cns
from emulator.nvme.migration import cdq, ctrlstate, memtrack, wire
from emulator.nvme.spec import CNS, Command, invalid_field

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller


def _mmc_fields(ctrl: "Controller", b: bytearray) -> None:
    """OACS.HMLMS, the tracking and CDQ limits, TRATTR: on MMCs only (Identify Controller bytes 570-587).
    HMPRE stays 0 on every controller (no Host Memory Buffer next to an MMC)."""
    if not ctrl.config.is_mmc:
        return
    oacs = int.from_bytes(b[wire.IDC_OACS:wire.IDC_OACS + 2], "little") | wire.OACS_HMLMS
    b[wire.IDC_OACS:wire.IDC_OACS + 2] = oacs.to_bytes(2, "little")
    wire.IDC_LM_LIMITS.pack_into(
        b, wire.IDC_LM_LIMITS_OFFSET,
        memtrack.CMMRTD, memtrack.NMMRTD, memtrack.MINMRTG, memtrack.MAXMRTG,
        wire.TRATTR_THMCS | wire.TRATTR_TUDCS,  # MRTLL=0: any range length
        cdq.MCUDMQ, cdq.MNSUDMQ, cdq.MCMR, cdq.NMCMR, cdq.MCDQPC)


def _lbamqf(ctrl: "Controller", b: bytearray) -> None:
    """NVM CS 1.2 Figure 120 byte 24 LBAMQF: 0h = LBA Migration Queue Entry Type 0.
    (The Samsung QEMU branch puts 1 at Identify Namespace byte 9: not the spec.)"""
    b[wire.NVM_IDC_LBAMQF] = 0x0


CTRL_PATCHERS.append(_mmc_fields)
NVM_CTRL_PATCHERS.append(_lbamqf)


@cns(CNS.SUPPORTED_CTRL_STATE_FORMATS)
def supported_controller_state_formats(ctrl: "Controller", cmd: Command) -> bytes:
    """CNS 20h (Base 2.1 prints 21h: a typo fixed in 2.3): NV, NUUID, the version
    list (index 1 = first), the vendor UUID list.  MMC only."""
    if not ctrl.config.is_mmc:
        raise invalid_field("CNS 20h: not a Migration Management Controller")
    out = bytearray(wire.CNS20_HEADER.pack(len(ctrlstate.VERSIONS), len(ctrlstate.UUIDS)))
    for v in ctrlstate.VERSIONS:
        out += v.to_bytes(2, "little")
    for u in ctrlstate.UUIDS:
        out += u
    return bytes(out)
