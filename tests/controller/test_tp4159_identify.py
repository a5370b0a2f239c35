"""TP4159 capability discovery through the host driver over vfio-user (issue 5)."""
from __future__ import annotations

import struct
import uuid

import pytest

from emulator.nvme.migration import wire
from emulator.nvme.spec import LID, AdminOpcode, Generic
from tp4159_common import MMC, Lm, invalid_field, lm  # noqa: F401


def test_mmc_reports_hmlms_and_limits(lm: Lm) -> None:
    idc = lm.m.h.identify(cns=1)
    oacs = struct.unpack_from("<H", idc, 256)[0]
    assert oacs & wire.OACS_HMLMS
    assert struct.unpack_from("<I", idc, 272)[0] == 0  # HMPRE
    (cmmrtd, nmmrtd, minmrtg, maxmrtg, trattr, mcudmq, mnsudmq, mcmr, nmcmr,
     mcdqpc) = struct.unpack_from("<HHBBBxHHHHH", idc, 570)
    assert (cmmrtd, nmmrtd, minmrtg, maxmrtg) == (64, 256, 0, 10)
    assert trattr == wire.TRATTR_THMCS | wire.TRATTR_TUDCS
    assert (mcudmq, mnsudmq, mcmr, nmcmr, mcdqpc) == (4, 16, 64, 256, 256)


def test_migratable_controller_has_no_lm_fields(lm: Lm) -> None:
    idc = lm.g.identify(cns=1)
    assert not struct.unpack_from("<H", idc, 256)[0] & wire.OACS_HMLMS
    assert struct.unpack_from("<I", idc, 272)[0] == 0  # HMPRE = 0 here too
    assert idc[570:588] == bytes(18)


def test_lbamqf_is_entry_type_0(lm: Lm) -> None:
    assert lm.m.h.identify(cns=6, csi=0)[wire.NVM_IDC_LBAMQF] == 0


def test_cns_20h(lm: Lm) -> None:
    data = lm.m.h.identify(cns=0x20)
    nv, nuuid = data[0], data[1]
    assert (nv, nuuid) == (1, 1)
    assert struct.unpack_from("<H", data, 2)[0] == 0  # version 0 at index 1
    assert uuid.UUID(bytes=data[4:20]) == wire.VENDOR_STATE_UUID
    assert data[20:] == bytes(4096 - 20)


def test_cns_20h_is_invalid_field_on_a_migratable_controller(lm: Lm) -> None:
    invalid_field(lm.g.admin(AdminOpcode.IDENTIFY, read_len=4096, cdw10=0x20))


@pytest.mark.parametrize("opcode", [0x3D, 0x3E, 0x41, 0x42, 0x45])
def test_privileged_opcodes_are_invalid_opcode_on_a_migratable_controller(lm: Lm, opcode: int) -> None:
    c = lm.g.admin(opcode, cdw11=MMC)
    assert (c.sct, c.sc) == (0, Generic.INVALID_OPCODE), c


def test_commands_supported_and_effects(lm: Lm) -> None:
    def acs(h, opc):  # type: ignore[no-untyped-def]
        data = h.get_log_page(LID.COMMANDS_SUPPORTED_EFFECTS, 4096).data
        return struct.unpack_from("<I", data, opc * 4)[0] & 1
    for opc in (0x3D, 0x3E, 0x41, 0x42, 0x45):
        assert acs(lm.m.h, opc) == 1 and acs(lm.g, opc) == 0
    assert acs(lm.g, 0x84) == 1  # Sanitize everywhere


def test_cdq_feature_is_not_there_on_a_migratable_controller(lm: Lm) -> None:
    invalid_field(lm.g.admin(AdminOpcode.GET_FEATURES, cdw10=0x21, cdw11=1, read_len=512))
    invalid_field(lm.g.admin(AdminOpcode.SET_FEATURES, cdw10=0x21, cdw11=1))
