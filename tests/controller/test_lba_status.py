"""Get LBA Status ATYPE 02h and TLBAAG allocation tracking through the host driver (issue 4, TP4165)."""
from __future__ import annotations

import signal
import struct
from pathlib import Path

import pytest
import yaml

from emulator.guest.emuproc import EmulatorProcess
from emulator.host.driver import NvmeHost
from emulator.host.memory import HostMemory
from emulator.host.transport import VfioUserTransport
from emulator.nvme.spec import AdminOpcode, Generic, LID
from emulator.vfio_user.client import VfioUserClient
from lba_status_helpers import (CMPC_COMPLETE, CMPC_INCOMPLETE, expected, get_lba_status,
                                mndw_for, parse, scan)

NSZE = (4 << 20) // 512  # 8192 LBAs, 1024 granules of 8
SMALL = {
    "namespaces": [{"nsid": 1, "size": "4MiB", "lba_size": 512},  # tlbaag default 8 (4 KiB)
                   {"nsid": 2, "size": "8MiB", "lba_size": 4096},  # tlbaag default 1 (4 KiB)
                   {"nsid": 3, "size": "1MiB", "lba_size": 512, "tlbaag": 64}],
    "controllers": [{"cntlid": 1, "type": "io"}],
}


@pytest.fixture
def h(emu):
    return emu(SMALL).host()


def write(h, nsid: int, slba: int, nlb: int, lba_size: int = 512, fill: int = 0xA5) -> None:
    assert h.write(nsid, slba, bytes([fill]) * (nlb * lba_size), lba_size=lba_size).ok


# -- capability discovery ------------------------------------------------------------------------
def test_identify_reports_tlbaag_and_ralbas(h):
    for nsid, tlbaag in ((1, 8), (2, 1), (3, 64)):
        nvm_ns = h.identify(cns=0x05, nsid=nsid, csi=0)
        assert struct.unpack_from("<I", nvm_ns, 292)[0] == tlbaag  # TLBAAG, NVM CS 1.2 Fig. 118
    nvm_ctrl = h.identify(cns=0x06, csi=0)
    assert struct.unpack_from("<H", nvm_ctrl, 18)[0] & 0x1  # AOCS.RALBAS, Fig. 120
    idc = h.identify(cns=0x01)
    assert struct.unpack_from("<H", idc, 256)[0] & 0x200  # OACS.GLSS: 10h/11h offered (issue 11)
    effects = h.get_log_page(LID.COMMANDS_SUPPORTED_EFFECTS, 4096)
    assert effects.ok
    assert struct.unpack_from("<I", effects.data, 4 * AdminOpcode.GET_LBA_STATUS)[0] & 0x1  # CSUPP


# -- patterns --------------------------------------------------------------------------------------
def test_empty_namespace(h):
    c = get_lba_status(h, 1)
    assert c.ok
    assert parse(c.data) == (0, CMPC_COMPLETE, [])
    assert struct.unpack_from("<Q", h.identify(cns=0, nsid=1), 16)[0] == 0  # NUSE


def test_single_lbas(h):
    writes = [(0, 1), (100, 1), (4095, 1), (NSZE - 1, 1)]
    for slba, nlb in writes:
        write(h, 1, slba, nlb)
    got, _ = scan(h, 1)
    assert got == [(0, 8), (96, 8), (4088, 8), (NSZE - 8, 8)] == expected(writes, 8, NSZE)
    nuse = struct.unpack_from("<Q", h.identify(cns=0, nsid=1), 16)[0]
    assert nuse == 4 * 8  # NUSE from the bitmap: whole granules


def test_granule_edges_and_coalescing(h):
    writes = [(7, 2), (23, 2), (40, 8), (63, 1), (72, 1)]  # granules 0-1, 2-3, 5, 7, 9
    for slba, nlb in writes:
        write(h, 1, slba, nlb)
    got, _ = scan(h, 1)
    assert got == [(0, 32), (40, 8), (56, 8), (72, 8)] == expected(writes, 8, NSZE)
    # a range starting and ending inside granules is clipped (first DSLBA = lowest LBA >= SLBA)
    assert scan(h, 1, slba=3, rl=2)[0] == [(3, 2)]
    assert scan(h, 1, slba=30, rl=20)[0] == [(30, 2), (40, 8)]
    assert scan(h, 1, slba=48, rl=8)[0] == []
    assert scan(h, 1, slba=33, rl=0)[0] == [(40, 8), (56, 8), (72, 8)]


def test_whole_namespace_full(h):
    for slba in range(0, NSZE, 256):  # Write Zeroes without DEAC allocates
        assert h.write_zeroes(1, slba, 256).ok
    assert scan(h, 1)[0] == [(0, NSZE)]
    assert scan(h, 1, slba=NSZE - 1)[0] == [(NSZE - 1, 1)]
    assert struct.unpack_from("<Q", h.identify(cns=0, nsid=1), 16)[0] == NSZE
    # the 4 KiB-LBA namespace, TLBAAG 1, filled by writes
    n2 = (8 << 20) // 4096
    for slba in range(0, n2, 32):
        write(h, 2, slba, 32, lba_size=4096)
    assert scan(h, 2)[0] == [(0, n2)]


def test_tlbaag_64_and_range_past_the_end(h):
    n3 = (1 << 20) // 512  # 2048 LBAs, 32 granules of 64
    write(h, 3, 64, 1)
    write(h, 3, n3 - 1, 1)
    assert scan(h, 3)[0] == [(64, 64), (n3 - 64, 64)]
    # SLBA + RL beyond NSZE is clipped at NSZE
    assert scan(h, 3, slba=n3 - 10, rl=1000)[0] == [(n3 - 10, 10)]


def test_deallocation_clears_only_whole_granules(h):
    write(h, 1, 0, 64)  # granules 0..7
    assert h.deallocate(1, [(4, 8)]).ok  # covers no whole granule
    assert scan(h, 1)[0] == [(0, 64)]
    assert h.deallocate(1, [(8, 16), (33, 7)]).ok  # granules 1, 2; 33..39 is partial
    assert scan(h, 1)[0] == [(0, 8), (24, 40)]
    assert h.write_zeroes(1, 40, 16, deac=True).ok  # Write Zeroes with DEAC: granules 5, 6
    assert scan(h, 1)[0] == [(0, 8), (24, 16), (56, 8)]
    # deallocated LBAs read as zeroes (DLFEAT); the partial granule's kept LBAs too
    assert h.read(1, 8, 16).data == bytes(16 * 512)
    assert h.read(1, 4, 4).data == bytes(4 * 512)
    assert h.read(1, 0, 4).data == b"\xa5" * (4 * 512)
    assert struct.unpack_from("<Q", h.identify(cns=0, nsid=1), 16)[0] == 4 * 8  # NUSE
    # a deallocation reaching NSZE covers the last granule; the whole namespace clears all
    assert h.deallocate(1, [(0, NSZE)]).ok
    assert parse(get_lba_status(h, 1).data) == (0, CMPC_COMPLETE, [])


# -- continuation ----------------------------------------------------------------------------------
def test_continuation_after_a_full_buffer(h):
    writes = [(g * 8 * 3 + (g % 8), 1) for g in range(200)]  # every third granule
    for slba, nlb in writes:
        write(h, 1, slba, nlb)
    want = expected(writes, 8, NSZE)
    assert len(want) == 200
    c = get_lba_status(h, 1, mndw=mndw_for(7))
    nlsd, cmpc, descs = parse(c.data)
    assert (nlsd, cmpc) == (7, CMPC_INCOMPLETE) and descs == want[:7]
    for per in (1, 7, 64, 199, 200, 255):
        got, commands = scan(h, 1, mndw=mndw_for(per))
        assert got == want, per
        assert commands == -(-200 // per)  # a buffer filled exactly by the last ones: complete
    # exactly as many descriptors as fit, and nothing after them: complete, not incomplete
    assert parse(get_lba_status(h, 1, mndw=mndw_for(200)).data)[:2] == (200, CMPC_COMPLETE)
    assert parse(get_lba_status(h, 1, mndw=mndw_for(199)).data)[:2] == (199, CMPC_INCOMPLETE)
    # continuation inside a range (RL)
    assert scan(h, 1, slba=100, rl=1000, mndw=mndw_for(3))[0] == expected(writes, 8, NSZE, 100, 1100)


def test_mndw_smaller_than_the_header(h):
    write(h, 1, 0, 1)
    c = get_lba_status(h, 1, mndw=0)  # 4 bytes: only NLSD fits, and no descriptor
    assert c.ok and struct.unpack_from("<I", c.data)[0] == 0
    c = get_lba_status(h, 1, mndw=1)  # the header alone: no descriptor, but more exist
    assert c.ok and parse(c.data) == (0, CMPC_INCOMPLETE, [])


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("atype", [0x00, 0x01, 0x03, 0x12, 0xFF])
def test_other_action_types_are_invalid_field(h, atype):
    c = get_lba_status(h, 1, atype=atype)
    assert (c.sct, c.sc, c.dnr) == (0, Generic.INVALID_FIELD, True)


def test_error_statuses(h):
    for nsid in (0, 4, 0xFFFFFFFF):  # not attached / broadcast: not supported by 86h
        c = get_lba_status(h, nsid)
        assert (c.sct, c.sc) == (0, Generic.INVALID_NAMESPACE), nsid
    for slba in (NSZE, NSZE + 1, 1 << 40, (1 << 64) - 1):
        c = get_lba_status(h, 1, slba=slba)
        assert (c.sct, c.sc) == (0, Generic.LBA_OUT_OF_RANGE), slba
    assert get_lba_status(h, 1, slba=NSZE - 1).ok


# -- restarts --------------------------------------------------------------------------------------
def _pattern(h) -> None:
    for slba, nlb in [(0, 1), (17, 30), (1000, 8), (NSZE - 3, 3)]:
        write(h, 1, slba, nlb)
    assert h.write_zeroes(1, 2048, 64).ok  # no DEAC: allocated, data is zeroes
    assert h.deallocate(1, [(24, 8)]).ok  # granule 3 out of the 17..46 run


AFTER_PATTERN = [(0, 8), (16, 8), (32, 16), (1000, 8), (2048, 64), (NSZE - 8, 8)]


def test_bits_come_back_exactly_after_restart(emu):
    e = emu(SMALL)
    h = e.host()
    _pattern(h)
    before = scan(h, 1)[0]
    assert before == AFTER_PATTERN
    e.restart()
    h = e.host()
    assert scan(h, 1)[0] == before
    assert scan(h, 2)[0] == [] and scan(h, 3)[0] == []
    e.restart()  # and again, after a restart without any I/O
    assert scan(e.host(), 1)[0] == before


def test_bits_come_back_after_the_emulator_is_killed_without_flush(emu, tmp_path: Path):
    """`nvme-emu serve` SIGKILLed after I/O over vfio-user: no flush, no close, no shutdown."""
    state = tmp_path / "state"
    config = dict(SMALL, state_dir=str(state))
    (tmp_path / "emu.yaml").write_text(yaml.safe_dump(config))
    proc = EmulatorProcess(tmp_path / "emu.yaml", tmp_path / "emu.log", name="killed")
    try:
        (sock,) = proc.start()
        h = NvmeHost(VfioUserTransport(VfioUserClient(str(sock)), HostMemory(8 << 20)))
        h.init()
        _pattern(h)
        assert scan(h, 1)[0] == AFTER_PATTERN
        proc.kill()
        assert proc.returncode == -signal.SIGKILL
    finally:
        proc.kill()
    h = emu(config).host()
    assert scan(h, 1)[0] == AFTER_PATTERN
    assert h.read(1, 17, 1).data == b"\xa5" * 512
    assert h.read(1, 24, 8).data == bytes(8 * 512)
    assert h.read(1, 2048, 64).data == bytes(64 * 512)
