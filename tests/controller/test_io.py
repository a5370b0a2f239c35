"""Data path through the host driver over vfio-user (issue 2)."""
from __future__ import annotations

import hashlib
import os

import pytest

from emulator.nvme.spec import Generic, IoOpcode

BIG = {
    "namespaces": [{"nsid": 1, "size": "64MiB", "lba_size": 512},
                   {"nsid": 2, "size": "32MiB", "lba_size": 4096}],
    "controllers": [{"cntlid": 1, "type": "io", "mdts": 10}],
}


def test_write_read_verify(emu):
    h = emu().host()
    data = os.urandom(64 * 1024)
    assert h.write(1, 2048, data).ok
    c = h.read(1, 2048, len(data) // 512)
    assert c.ok and c.data == data


@pytest.mark.parametrize("offset", [0, 4, 512, 4092, 2048])
@pytest.mark.parametrize("length", [512, 4096, 8192, 12288, 65536 + 512, 131072])
def test_prp_page_crossing(emu_shared, offset, length):
    """PRP1 with an offset, PRP2 as a page or a list, buffers that cross pages."""
    h = emu_shared
    data = os.urandom(length)
    slba = (offset * 7 + length) % 10000
    assert h.write(1, slba, data, buf_offset=offset).ok
    c = h.read(1, slba, length // 512, buf_offset=(offset + 8) % 4096)
    assert c.ok and c.data == data


@pytest.fixture
def emu_shared(emu):
    return emu().host()


def test_transfers_up_to_mdts_with_chained_prp_lists(emu):
    """mdts 10 = 4 MiB: 1024 pages, so the PRP list chains to a second page."""
    h = emu(BIG).host()
    mdts = 4 << 20
    data = os.urandom(mdts)
    assert h.write(1, 0, data, buf_offset=512).ok
    c = h.read(1, 0, mdts // 512)
    assert c.ok and hashlib.sha256(c.data).digest() == hashlib.sha256(data).digest()
    too_big = h.read(1, 0, mdts // 512 + 1)
    assert (too_big.sct, too_big.sc) == (0, Generic.INVALID_FIELD)


def test_4k_namespace(emu):
    h = emu(BIG).host()
    data = os.urandom(3 * 4096)
    assert h.write(2, 5, data, lba_size=4096).ok
    assert h.read(2, 5, 3, lba_size=4096).data == data
    assert h.read(2, 32 * 256, 1, lba_size=4096).sc == Generic.LBA_OUT_OF_RANGE


def test_flush_write_zeroes_deallocate(emu):
    h = emu().host()
    data = os.urandom(32 * 512)
    assert h.write(1, 0, data).ok
    assert h.flush(1).ok
    assert h.flush(0xFFFFFFFF).ok
    assert h.write_zeroes(1, 4, 4).ok
    got = h.read(1, 0, 32).data
    assert got[:2048] == data[:2048] and got[2048:4096] == bytes(2048) and got[4096:] == data[4096:]
    assert h.deallocate(1, [(8, 8), (24, 8)]).ok
    got = h.read(1, 0, 32).data
    assert got[4096:8192] == bytes(4096) and got[12288:] == bytes(4096)
    assert got[8192:12288] == data[8192:12288]
    assert h.write_zeroes(1, 16, 8, deac=True).ok
    assert h.read(1, 16, 8).data == bytes(4096)


def test_many_outstanding_commands_and_interrupts(emu):
    h = emu().host(use_interrupts=True, io_queues=2, qsize=32)
    payloads = {}
    cids = []
    for i in range(20):
        buf = h.mem.alloc(4096)
        d = os.urandom(4096)
        h.mem.write(buf, d)
        payloads[i] = d
        qid = 1 + i % 2
        cids.append((qid, h.submit(qid, IoOpcode.WRITE, 1, buf, 0, cdw10=i * 8, cdw12=7)))
    for qid, cid in cids:
        assert h.wait(qid, cid).ok
    for i, d in payloads.items():
        assert h.read(1, i * 8, 8, qid=2).data == d


def test_data_persists_across_restart(emu):
    e = emu()
    h = e.host()
    data = os.urandom(8192)
    assert h.write(1, 777, data).ok
    e.restart()
    h2 = e.host()
    assert h2.read(1, 777, 16).data == data


def test_shutdown_flushes(emu):
    e = emu()
    h = e.host()
    data = os.urandom(4096)
    assert h.write(1, 10, data).ok
    assert h.shutdown() == 2
    path = e.config.namespaces[0].file
    with open(path, "rb") as f:
        f.seek(10 * 512)
        assert f.read(4096) == data
