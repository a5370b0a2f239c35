"""SGLs for I/O commands through the host driver (issue 11): Data Block, Segment and Last Segment
descriptors, and the SGL error statuses."""
from __future__ import annotations

import os
import struct

import pytest

from emulator.nvme.sgl import SglStatus
from emulator.nvme.spec import AdminOpcode, Generic, IoOpcode

CFG = {"namespaces": [{"nsid": 1, "size": "16MiB"}], "controllers": [{"cntlid": 1, "type": "io", "mdts": 8}]}


@pytest.fixture
def h(emu):
    return emu(CFG).host()


def test_sgls_advertised(h):
    assert struct.unpack_from("<I", h.identify(cns=1), 536)[0] & 0x3 == 0x1


@pytest.mark.parametrize("pieces", [1, 2, 4, 5, 9, 33])
@pytest.mark.parametrize("offset", [0, 8, 4092])
def test_sgl_write_read(h, pieces, offset):
    data = os.urandom(128 * 1024 + 512)
    nlb = len(data) // 512
    assert h.command(1, IoOpcode.WRITE, nsid=1, data=data, cdw10=64, cdw12=nlb - 1, sgl=pieces,
                     buf_offset=offset).ok
    assert h.read(1, 64, nlb).data == data  # PRPs read what SGLs wrote
    c = h.command(1, IoOpcode.READ, nsid=1, read_len=len(data), cdw10=64, cdw12=nlb - 1, sgl=pieces,
                  buf_offset=offset)
    assert c.ok and c.data == data


def _raw(h, sgl1_addr, sgl1_len, ident, nlb=8, opc=IoOpcode.READ):
    cid = h.submit(1, opc, 1, sgl1_addr, sgl1_len | (ident << 56), cdw12=nlb - 1, flags=1 << 6)
    return h.wait(1, cid)


def test_sgl_errors(h):
    buf = h.mem.alloc(8192)
    seg = h.mem.alloc(4096)
    err = lambda c: (c.sct, c.sc)  # noqa: E731
    assert err(_raw(h, buf, 2048, 0x00)) == (0, SglStatus.DATA_SGL_LENGTH_INVALID)  # short
    assert err(_raw(h, buf, 8192, 0x00)) == (0, SglStatus.DATA_SGL_LENGTH_INVALID)  # oversized
    assert err(_raw(h, buf, 4096, 0x10)) == (0, SglStatus.SGL_DESCRIPTOR_TYPE_INVALID)  # bit bucket
    assert err(_raw(h, buf, 4096, 0x01)) == (0, SglStatus.SGL_DESCRIPTOR_TYPE_INVALID)  # offset sub type
    assert err(_raw(h, seg, 24, 0x30)) == (0, SglStatus.INVALID_SGL_SEGMENT_DESCRIPTOR)  # not 16n
    # a Last Segment that holds a Segment descriptor
    h.mem.write(seg, struct.pack("<QI3xB", buf, 2048, 0) + struct.pack("<QI3xB", seg, 32, 0x20))
    assert err(_raw(h, seg, 32, 0x30)) == (0, SglStatus.INVALID_SGL_SEGMENT_DESCRIPTOR)
    # a Segment that names itself forever: refused, not a hang
    h.mem.write(seg, struct.pack("<QI3xB", seg, 16, 0x20))
    assert err(_raw(h, seg, 16, 0x20)) == (0, SglStatus.INVALID_NUMBER_OF_SGL_DESCRIPTORS)
    # a segment outside guest memory
    assert err(_raw(h, 1 << 50, 32, 0x30)) == (0, Generic.DATA_TRANSFER_ERROR)
    # PSDT 11b reserved; SGLs on the admin queue refused
    cid = h.submit(1, IoOpcode.READ, 1, buf, 4096, cdw12=7, flags=3 << 6)
    assert err(h.wait(1, cid)) == (0, Generic.INVALID_FIELD)
    cid = h.submit(0, AdminOpcode.IDENTIFY, 0, buf, 4096, cdw10=1, flags=1 << 6)
    assert err(h.wait(0, cid)) == (0, Generic.INVALID_FIELD)
