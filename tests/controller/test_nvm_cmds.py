"""Format NVM, Write Uncorrectable, Compare, Verify, Copy, Get LBA Status 10h/11h and log 0Eh
through the host driver (issue 11)."""
from __future__ import annotations

import os
import struct

import pytest

from emulator.nvme.spec import SCT, CommandSpecific, Generic, IoOpcode, LID, MediaError, NvmCommandSpecific
from lba_status_helpers import get_lba_status

CFG = {
    "namespaces": [{"nsid": 1, "size": "16MiB"}, {"nsid": 2, "size": "16MiB"},
                   {"nsid": 3, "size": "16MiB", "lba_size": 4096}, {"nsid": 4, "size": "1MiB"}],
    "controllers": [{"cntlid": 1, "type": "io", "namespaces": [1, 2, 3]},
                    {"cntlid": 2, "type": "io", "namespaces": [4]}],
}
URE = (SCT.MEDIA, MediaError.UNRECOVERED_READ_ERROR)


def err(c):
    return (c.sct, c.sc)


def rw_cdws(slba: int, nlb: int) -> dict:
    return {"cdw10": slba & 0xFFFFFFFF, "cdw11": slba >> 32, "cdw12": nlb - 1}


def write_uncor(h, nsid, slba, nlb):
    return h.command(1, IoOpcode.WRITE_UNCORRECTABLE, nsid=nsid, **rw_cdws(slba, nlb))


def verify(h, nsid, slba, nlb):
    return h.command(1, IoOpcode.VERIFY, nsid=nsid, **rw_cdws(slba, nlb))


def compare(h, nsid, slba, data, lba=512):
    return h.command(1, IoOpcode.COMPARE, nsid=nsid, data=data, **rw_cdws(slba, len(data) // lba))


def copy(h, nsid, sdlba, ranges, desfmt=0, **kw):
    """ranges: (slba, nlb) or (snsid, slba, nlb) for formats 2h/3h."""
    size = 40 if desfmt in (1, 3) else 32
    buf = bytearray(size * len(ranges))
    for i, r in enumerate(ranges):
        snsid, slba, nlb = r if len(r) == 3 else (0, *r)
        struct.pack_into("<I4xQH", buf, i * size, snsid, slba, nlb - 1)
    return h.command(1, IoOpcode.COPY, nsid=nsid, data=bytes(buf), cdw10=sdlba & 0xFFFFFFFF,
                     cdw11=sdlba >> 32, cdw12=(len(ranges) - 1) | (desfmt << 8), **kw)


@pytest.fixture
def e(emu):
    return emu(CFG)


def test_write_uncorrectable_read_fails_until_written(e):
    h = e.host()
    data = os.urandom(16 * 512)
    assert h.write(1, 100, data).ok
    assert write_uncor(h, 1, 104, 4).ok
    assert err(h.read(1, 100, 16)) == URE
    assert err(h.read(1, 107, 1)) == URE
    assert h.read(1, 100, 4).data == data[:2048]  # outside the marks
    assert err(verify(h, 1, 100, 16)) == URE
    assert verify(h, 1, 108, 8).ok
    assert h.write(1, 104, bytes(1024)).ok  # heals 104..105
    assert err(h.read(1, 104, 4)) == URE
    assert h.read(1, 104, 2).ok
    assert h.write_zeroes(1, 106, 2).ok  # heals the rest
    assert h.read(1, 100, 16).ok
    assert err(write_uncor(h, 1, (16 << 20) // 512 - 1, 2)) == (0, Generic.LBA_OUT_OF_RANGE)
    assert err(write_uncor(h, 9, 0, 1)) == (0, Generic.INVALID_NAMESPACE)
    assert err(write_uncor(h, 4, 0, 1)) == (0, Generic.INVALID_NAMESPACE)  # not attached


def test_uncorrectable_lba_status_and_log_persist(e):
    h = e.host()
    assert write_uncor(h, 1, 10, 3).ok
    assert write_uncor(h, 1, 13, 2).ok  # adjacent: one range
    assert write_uncor(h, 1, 1000, 1).ok
    assert write_uncor(h, 3, 7, 1).ok
    for atype in (0x10, 0x11):
        c = get_lba_status(h, 1, atype=atype)
        assert c.ok
        nlsd, cmpc = struct.unpack_from("<IB", c.data)
        descs = [struct.unpack_from("<QI", c.data, 8 + 16 * i) for i in range(nlsd)]
        assert (cmpc, descs) == (2, [(10, 4), (1000, 0)])  # NLB 0's based
    c = get_lba_status(h, 1, slba=12, rl=100, atype=0x11)
    assert struct.unpack_from("<IBxxxQI", c.data) == (1, 2, 12, 2)
    e.restart()
    h = e.host()
    assert err(h.read(1, 11, 1)) == URE
    log = h.get_log_page(LID.LBA_STATUS_INFORMATION, 4096).data
    lslplen, nlslne, estulb, lsgc = struct.unpack_from("<III2xH", log)
    assert (nlslne, estulb) == (2, 7)
    assert lslplen == 16 + 16 + 2 * 16 + 16 + 16
    assert struct.unpack_from("<IIB", log, 16) == (1, 2, 0x11)
    assert struct.unpack_from("<QI", log, 32) == (10, 5)
    assert struct.unpack_from("<QI", log, 48) == (1000, 1)
    assert struct.unpack_from("<IIB", log, 64) == (3, 1, 0x11)


def test_compare(e):
    h = e.host()
    data = os.urandom(8 * 512)
    assert h.write(1, 50, data).ok
    assert compare(h, 1, 50, data).ok
    other = bytearray(data)
    other[4095] ^= 1
    assert err(compare(h, 1, 50, bytes(other))) == (SCT.MEDIA, MediaError.COMPARE_FAILURE)
    assert err(compare(h, 1, (16 << 20) // 512 - 4, data)) == (0, Generic.LBA_OUT_OF_RANGE)
    assert write_uncor(h, 1, 52, 1).ok
    assert err(compare(h, 1, 50, data)) == URE


def test_copy_inside_and_across_namespaces(e):
    h = e.host()
    a, b, c = os.urandom(4096), os.urandom(2048), os.urandom(8192)
    assert h.write(1, 0, a).ok and h.write(1, 100, b).ok and h.write(2, 40, c).ok
    for desfmt in (0, 1):
        assert copy(h, 1, 1000 + desfmt * 100, [(0, 8), (100, 4)], desfmt=desfmt).ok
        assert h.read(1, 1000 + desfmt * 100, 12).data == a + b
    for desfmt in (2, 3):
        dst = 2000 + desfmt * 100
        assert copy(h, 1, dst, [(2, 40, 16), (1, 0, 8)], desfmt=desfmt).ok
        assert h.read(1, dst, 24).data == c + a
    assert copy(h, 2, 0, [(1, 100, 4)], desfmt=2, ).ok  # into another namespace
    assert h.read(2, 0, 4).data == b


def test_copy_errors(e):
    h = e.host()
    n = (16 << 20) // 512
    assert err(copy(h, 1, 10, [(5, 10)])) == (1, NvmCommandSpecific.OVERLAPPING_IO_RANGE)
    assert err(copy(h, 1, 10, [(0, 11)])) == (1, NvmCommandSpecific.OVERLAPPING_IO_RANGE)
    assert copy(h, 1, 30, [(0, 10), (20, 5)]).ok
    assert err(copy(h, 1, n - 4, [(0, 8)])) == (0, Generic.LBA_OUT_OF_RANGE)
    assert err(copy(h, 1, 0, [(n - 4, 8)])) == (0, Generic.LBA_OUT_OF_RANGE)
    incompatible = (1, NvmCommandSpecific.INCOMPATIBLE_NAMESPACE_OR_FORMAT)
    assert err(copy(h, 1, 0, [(3, 0, 1)], desfmt=2)) == incompatible  # 4 KiB source, 512 B destination
    assert err(copy(h, 1, 0, [(4, 0, 1)], desfmt=2)) == (0, Generic.INVALID_NAMESPACE)  # not attached
    assert err(copy(h, 1, 0, [(100, 1)], desfmt=4)) == (0, Generic.INVALID_FIELD)
    too_many = copy(h, 1, 0, [(100 + i, 1) for i in range(129)])  # MSRC + 2 ranges
    assert err(too_many) == (1, NvmCommandSpecific.COMMAND_SIZE_LIMIT_EXCEEDED)
    assert write_uncor(h, 1, 500, 1).ok
    assert err(copy(h, 1, 0, [(499, 4)])) == URE


def test_format_nvm(e):
    h = e.host()
    data = os.urandom(4096)
    assert h.write(1, 0, data).ok
    assert write_uncor(h, 1, 100, 1).ok
    assert h.format_nvm(1, lbaf=1, ses=1).ok  # 4 KiB LBAs, user data erase
    ns = h.identify(cns=0, nsid=1)
    assert ns[26] == 1 and struct.unpack_from("<QQQ", ns) == (4096, 4096, 0)
    assert struct.unpack_from("<I", h.identify(cns=5, nsid=1, csi=0), 292)[0] == 1  # TLBAAG follows
    assert h.read(1, 0, 1, lba_size=4096).data == bytes(4096)
    assert h.read(1, 12, 1, lba_size=4096).ok  # the mark is gone
    assert h.write(1, 3, data, lba_size=4096).ok
    e.restart()
    h = e.host()
    assert h.identify(cns=0, nsid=1)[26] == 1
    assert h.read(1, 3, 1, lba_size=4096).data == data
    assert h.format_nvm(0xFFFFFFFF, lbaf=0, ses=0).ok  # every attached namespace
    for nsid in (1, 2, 3):
        ns = h.identify(cns=0, nsid=nsid)
        assert ns[26] == 0 and struct.unpack_from("<Q", ns)[0] == (16 << 20) // 512
    assert h.read(1, 24, 8).data == bytes(4096)


def test_format_errors(e):
    h = e.host()
    assert err(h.format_nvm(1, lbaf=2)) == (1, CommandSpecific.INVALID_FORMAT)
    assert err(h.format_nvm(1, ses=2)) == (0, Generic.INVALID_FIELD)  # no crypto erase
    assert err(h.format_nvm(1, ses=7)) == (0, Generic.INVALID_FIELD)
    assert err(h.format_nvm(4)) == (0, Generic.INVALID_NAMESPACE)  # not attached here
    c = h.admin(0x80, nsid=1, cdw10=1 << 5)  # PI type 1
    assert err(c) == (1, CommandSpecific.INVALID_FORMAT)


@pytest.mark.parametrize("oipbp,owpass", [(False, 1), (True, 2), (True, 3), (True, 0)])
def test_sanitize_overwrite(e, oipbp, owpass):
    """The last pass always writes OVRPAT (Base 2.1 §8.1.24, pattern table: with OIPBP an
    even pass count starts inverted); tests/controller/test_sanitize.py checks every pass."""
    want = 0x12345678
    h = e.host()
    assert write_uncor(h, 1, 5, 1).ok
    c = h.admin(0x84, cdw10=0x3 | (owpass << 4) | (int(oipbp) << 8), cdw11=0x12345678)
    assert c.ok, c
    pattern = struct.pack("<I", want)
    assert h.read(1, 0, 8).data == pattern * 1024  # the mark is gone with the rest
    assert h.read(3, 4095, 1, lba_size=4096).data == pattern * 1024
    assert struct.unpack_from("<Q", h.identify(cns=0, nsid=1), 16)[0] == (16 << 20) // 512  # NUSE: all
    log = h.get_log_page(LID.SANITIZE_STATUS, 512).data
    sprog, sstat, scdw10 = struct.unpack_from("<HHI", log)
    assert (sprog, sstat & 0x7, (sstat >> 3) & 0x1F) == (0xFFFF, 1, owpass or 16)
    assert sstat & (1 << 8)  # GDE: nothing written since
    assert scdw10 & 0x7 == 0x3


def test_sanitize_block_erase_clears_marks(e):
    h = e.host()
    assert h.write(2, 0, os.urandom(4096)).ok
    assert write_uncor(h, 1, 5, 1).ok
    assert h.admin(0x84, cdw10=0x2).ok
    assert h.read(1, 5, 1).data == bytes(512)
    assert h.read(2, 0, 8).data == bytes(4096)
    assert struct.unpack_from("<Q", h.identify(cns=0, nsid=2), 16)[0] == 0


def test_compare_verify_argument_errors(e):
    h = e.host()
    n = (16 << 20) // 512
    assert err(verify(h, 1, n - 1, 2)) == (0, Generic.LBA_OUT_OF_RANGE)
    assert err(verify(h, 7, 0, 1)) == (0, Generic.INVALID_NAMESPACE)
    assert err(verify(h, 4, 0, 1)) == (0, Generic.INVALID_NAMESPACE)  # attached elsewhere
    assert err(compare(h, 4, 0, bytes(512))) == (0, Generic.INVALID_NAMESPACE)
    assert verify(h, 3, 4095, 1).ok  # the last LBA of a 4 KiB namespace
    too_long = h.command(1, IoOpcode.COMPARE, nsid=1, read_len=0, cdw12=0x1FFF)  # 4 MiB > MDTS
    assert err(too_long) == (0, Generic.INVALID_FIELD)


def test_lba_status_information_alert(e):
    from emulator.nvme.spec import AdminOpcode
    h = e.host()
    assert struct.unpack_from("<I", h.identify(cns=1), 92)[0] & (1 << 13)  # OAES.LBAS
    assert write_uncor(h, 1, 0, 1).ok  # no event: not enabled
    h.set_features(0x0B, 1 << 13)  # Asynchronous Event Configuration: LBA Status Information
    cid = h.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST)
    assert h.poll(0, cid) is None
    assert write_uncor(h, 1, 10, 1).ok
    ev = h.wait(0, cid)
    assert (ev.dw0 & 0x7, (ev.dw0 >> 8) & 0xFF, (ev.dw0 >> 16) & 0xFF) == (2, 0x05, 0x0E)
    assert h.get_log_page(LID.LBA_STATUS_INFORMATION, 512).ok  # RAE=0 re-arms notices


def test_sanitize_overwrite_arguments(e):
    h = e.host()
    assert err(h.admin(0x84, cdw10=0x3 | (1 << 9), cdw11=1)) == (0, Generic.INVALID_FIELD)  # NDAS: NDI
    assert err(h.admin(0x84, cdw10=0x4)) == (0, Generic.INVALID_FIELD)  # Crypto Erase: not in SANICAP
    assert struct.unpack_from("<I", h.identify(cns=1), 328)[0] & 0x4  # SANICAP.OWS


def test_format_with_no_room_for_the_new_bitmap(e, monkeypatch):
    """A full file system while Format NVM sets up the new format's allocation
    bitmap: Capacity Exceeded (never Internal Error), and the namespace stays
    usable in its old format, erased as the command asked (found by the soak)."""
    import errno
    from emulator.nvme import namespace as nsmod
    h = e.host()
    assert h.write(1, 0, b"\x11" * 4096).ok
    real = nsmod.AllocationMap.open
    calls = []

    def full_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    monkeypatch.setattr(nsmod.AllocationMap, "open", staticmethod(full_once))
    c = h.format_nvm(1, lbaf=1, ses=1)
    assert err(c) == (0, Generic.CAPACITY_EXCEEDED)
    monkeypatch.setattr(nsmod.AllocationMap, "open", real)
    assert h.identify(cns=0, nsid=1)[26] == 0  # still 512-byte LBAs
    assert h.read(1, 0, 8).data == bytes(4096)  # the user data erase happened
    assert h.write(1, 8, b"\x22" * 4096).ok and h.read(1, 8, 8).data == b"\x22" * 4096
    assert h.format_nvm(1, lbaf=1, ses=0).ok  # and a later Format works
