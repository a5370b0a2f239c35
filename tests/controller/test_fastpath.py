"""The I/O fast path (emulator/nvme/fastpath.py): the same cases on the C and the Python
implementation, through the host driver over vfio-user, and the same results as the normal
path (``off``) where both can be compared."""
from __future__ import annotations

import os
import random
import struct
import time
from typing import Any, Iterator

import pytest

from cbind import build, ioq
from emulator.host.driver import DOORBELL_BASE
from emulator.host.memory import HostMemory
from emulator.nvme import fastpath
from emulator.nvme.sgl import SglStatus
from emulator.nvme.spec import AdminOpcode, Generic, IoOpcode, pack_sqe
from lba_status_helpers import scan
from test_dma_remap import split_ram, take_cqes_without_doorbell

CFG = {
    "namespaces": [{"nsid": 1, "size": "16MiB", "lba_size": 512},
                   {"nsid": 2, "size": "16MiB", "lba_size": 4096}],
    "controllers": [{"cntlid": 1, "type": "io", "mdts": 10}],
}


@pytest.fixture(params=["c", "python"])
def path(request: Any) -> Iterator[str]:
    if request.param == "c" and ioq.LIB is None:
        if build.disabled() or build.compiler() is None:  # the Python path is all there is
            pytest.skip(f"C fast path not built ({build.why.get('ioq')}); a C compiler and cffi build it")
        pytest.fail(f"the C fast path did not build although a compiler is there: {build.why.get('ioq')}")
    old = fastpath.set_path(request.param)
    yield request.param
    fastpath.set_path(old)


def sealed_host(emu: Any, config: dict | None = None, qsize: int = 64, **kw: Any) -> Any:
    """A host whose memory is sealed like QEMU's memfd backend: the fast path's case."""
    e = emu(config or CFG, **kw)
    return e, e.host(qsize=qsize, memory=HostMemory(32 << 20, sealed=True))


def served(e: Any) -> dict[str, int]:
    return e.call(lambda: dict(e.subsystem.controllers[1].fast.completed))


def test_read_write_roundtrip_and_prp_shapes(emu: Any, path: str) -> None:
    e, h = sealed_host(emu)
    for offset in (0, 4, 512, 4092):
        for length in (512, 4096, 8192, 12288, 65536 + 512, 128 << 10):
            data = os.urandom(length)
            slba = (offset * 7 + length) % 20000
            assert h.write(1, slba, data, buf_offset=offset).ok
            c = h.read(1, slba, length // 512, buf_offset=(offset + 8) % 4096)
            assert c.ok and c.data == data
    big = os.urandom(4 << 20)  # MDTS: 1024 pages, a chained PRP list
    assert h.write(1, 0, big, buf_offset=512).ok
    assert h.read(1, 0, len(big) // 512).data == big
    data = os.urandom(3 * 4096)
    assert h.write(2, 5, data, lba_size=4096).ok and h.read(2, 5, 3, lba_size=4096).data == data
    assert served(e)[path] >= 2 * 4 * 6 + 4


def test_errors_get_the_normal_paths_statuses(emu: Any, path: str) -> None:
    e, h = sealed_host(emu)
    nsze = (16 << 20) // 512
    assert h.read(1, nsze - 1, 2).sc == Generic.LBA_OUT_OF_RANGE
    assert h.write(1, nsze, b"x" * 512).sc == Generic.LBA_OUT_OF_RANGE
    too_big = h.read(1, 0, (4 << 20) // 512 + 1)
    assert (too_big.sct, too_big.sc) == (0, Generic.INVALID_FIELD)
    assert h.read(3, 0, 1).sc == Generic.INVALID_NAMESPACE
    outside = h.read(1, 0, 1, prp1=0x10_0000_0000)
    assert (outside.sct, outside.sc) == (0, Generic.DATA_TRANSFER_ERROR)
    outside_list = h.command(1, IoOpcode.READ, nsid=1, read_len=0, prp1=h.mem.alloc(4096),
                             prp2=0x10_0000_0000, cdw12=63)  # 32 KiB: PRP2 is a list outside memory
    assert (outside_list.sct, outside_list.sc) == (0, Generic.DATA_TRANSFER_ERROR)
    bad_prp = h.command(1, IoOpcode.READ, nsid=1, prp1=h.mem.alloc(4096) + 2, cdw12=0)
    assert bad_prp.sc == Generic.PRP_OFFSET_INVALID
    errors = h.get_log_page(0x01, 64 * 5).data  # Error Information: newest first
    assert struct.unpack_from("<QHH", errors, 0)[0] >= 6
    assert h.read(1, 0, 1).ok  # and the next one is fast again
    assert served(e)[path] >= 1


def _one_doorbell(h: Any, cmds: list[bytes]) -> list[Any]:
    """Place ``cmds`` on I/O SQ 1, ring its tail doorbell once, take their CQEs."""
    q = h.queues[1]
    for raw in cmds:
        h.mem.write(q.sq_iova + q.sq_tail * 64, raw)
        q.sq_tail = (q.sq_tail + 1) % q.size
    h.t.mmio_write(DOORBELL_BASE + 2 * 4, 4, q.sq_tail)
    got: list[Any] = []
    deadline = time.monotonic() + 10
    while len(got) < len(cmds) and time.monotonic() < deadline:
        got += take_cqes_without_doorbell(h, 1)
    return got


def test_mixed_fast_and_slow_commands_complete_in_sq_order(emu: Any, path: str) -> None:
    e, h = sealed_host(emu)
    mem = h.mem
    data = os.urandom(4096)
    buf = mem.alloc(4096)
    mem.write(buf, data)
    q = h.queues[1]
    # Build the batch by hand so that a single doorbell releases all of it.
    cmds = [
        pack_sqe(IoOpcode.WRITE, cid=1, nsid=1, prp1=buf, cdw10=100, cdw12=7),
        pack_sqe(IoOpcode.VERIFY, cid=2, nsid=1, cdw10=100, cdw12=7),  # (a Flush completes off the loop)
        pack_sqe(IoOpcode.READ, cid=3, nsid=1, prp1=mem.alloc(4096), cdw10=100, cdw12=7),
        pack_sqe(IoOpcode.WRITE_ZEROES, cid=4, nsid=1, cdw10=104, cdw12=1),
        pack_sqe(IoOpcode.READ, cid=5, nsid=1, prp1=0x10_0000_0000, cdw10=100, cdw12=0),
        pack_sqe(IoOpcode.WRITE, cid=6, nsid=1, prp1=buf, cdw10=200, cdw12=7 | (1 << 30)),  # FUA
        pack_sqe(IoOpcode.READ, cid=7, nsid=1, prp1=mem.alloc(4096), cdw10=104, cdw12=7),
        pack_sqe(IoOpcode.WRITE, cid=8, nsid=1, prp1=buf, cdw10=300, cdw12=7),
    ]
    got = _one_doorbell(h, cmds)
    assert [c.cid for c in got] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [c.sqhd for c in got] == [(i + 1) % q.size for i in range(len(cmds))]
    assert [c.sc for c in got] == [0, 0, 0, 0, Generic.DATA_TRANSFER_ERROR, 0, 0, 0]
    h.t.mmio_write(DOORBELL_BASE + 3 * 4, 4, q.cq_head)
    assert h.read(1, 100, 8).data == data[:2048] + bytes(1024) + data[3072:]  # Write Zeroes 104-105
    assert h.read(1, 300, 8).data == data
    assert served(e)[path] >= 4


def _sgl_count(e: Any) -> int:
    return e.call(lambda: e.subsystem.controllers[1].stats.get("sgl_commands", 0))


def test_sgl_shapes_are_served(emu: Any, path: str) -> None:
    """SGL1 a Data Block, or a Last Segment of 1, 2, 3, 64 Data Blocks (Base 2.1 §4.3.2):
    any byte address (SGLS: no alignment requirement), pieces of any length."""
    e, h = sealed_host(emu)
    n = 0
    for offset in (0, 1, 8, 4093):
        for length in (512, 4096 + 512, 12288, 128 << 10, (128 << 10) + 1536):
            for pieces in (1, 2, 3, 64):
                if pieces > length // 16:
                    continue
                data = os.urandom(length)
                slba = (offset * 7 + length + pieces) % 20000
                kw = {"sgl": pieces, "sgl_per_segment": pieces, "buf_offset": offset}
                assert h.write(1, slba, data, **kw).ok
                assert h.read(1, slba, length // 512).data == data  # PRPs read what SGLs wrote
                c = h.read(1, slba, length // 512, **dict(kw, buf_offset=(offset + 3) % 4096))
                assert c.ok and c.data == data
                n += 2
    # a 4096-byte LBA namespace, a Last Segment with a zero-length Data Block in it
    data = os.urandom(3 * 4096)
    assert h.write(2, 5, data, lba_size=4096, sgl=2, sgl_per_segment=2).ok
    seg = h.mem.alloc(4096)
    buf = h.mem.alloc(3 * 4096)
    h.mem.write(seg, struct.pack("<QI3xB", buf, 4096, 0) + struct.pack("<QI3xB", 1 << 50, 0, 0)
                + struct.pack("<QI3xB", buf + 4096, 8192, 0))
    cid = h.submit(1, IoOpcode.READ, 2, seg, 48 | (0x30 << 56), cdw10=5, cdw12=2, flags=1 << 6)
    assert h.wait(1, cid).ok and h.mem.read(buf, len(data)) == data
    # a Last Segment of one Data Block (build_sgl puts a single piece in SGL1 itself)
    h.mem.write(seg, struct.pack("<QI3xB", buf + 5, 4096, 0))
    cid = h.submit(1, IoOpcode.READ, 2, seg, 16 | (0x30 << 56), cdw10=6, cdw12=0, flags=1 << 6)
    assert h.wait(1, cid).ok and h.mem.read(buf + 5, 4096) == data[4096:8192]
    n += 3
    assert served(e)[path] >= n + 30  # and the PRP reads
    assert _sgl_count(e) == n


def _sgl_step_aside_cases(h: Any) -> list[tuple[Any, ...]]:
    """Commands the fast path leaves to the normal path, each with a fresh SGL: their
    (SCT, SC) and the data a Read brought, for comparison with the normal path's."""
    mem = h.mem
    rng = random.Random(12)  # the same bytes on both paths
    data = rng.randbytes(4096)
    assert h.write(1, 40, data).ok
    buf = mem.alloc(16384)
    seg = mem.alloc(4096)
    seg2 = mem.alloc(4096)
    desc = lambda a, n, ident: struct.pack("<QI3xB", a, n, ident)  # noqa: E731
    gapped = mem.alloc(1100 * 1024)  # 1100 pieces of 512 bytes with a gap between each
    big = mem.alloc(1100 * 16)
    mem.write(big, b"".join(desc(gapped + i * 1024, 512, 0) for i in range(1100)))
    # (name, segment contents or None, SGL1 address, SGL1 length, SGL1 identifier, NLB, PSDT)
    cases = [
        ("data block shorter", None, buf, 2048, 0x00, 8, 1),
        ("data block longer", None, buf, 8192, 0x00, 8, 1),
        ("data block sub type 1h", None, buf, 4096, 0x01, 8, 1),
        ("bit bucket", None, buf, 4096, 0x10, 8, 1),
        ("keyed data block", None, buf, 4096, 0x40, 8, 1),
        ("transport data block", None, buf, 4096, 0x50, 8, 1),
        ("vendor specific", None, buf, 4096, 0xF0, 8, 1),
        ("data block outside memory", None, 1 << 50, 4096, 0x00, 8, 1),
        ("PSDT 10b", None, buf, 4096, 0x00, 8, 2),
        ("PSDT 11b", None, buf, 4096, 0x00, 8, 3),
        ("segment chain", [desc(buf, 2048, 0), desc(seg2, 16, 0x30)], seg, 32, 0x20, 8, 1),
        ("last segment of 24 bytes", [desc(buf, 4096, 0)], seg, 24, 0x30, 8, 1),
        ("last segment of 0 bytes", [desc(buf, 4096, 0)], seg, 0, 0x30, 8, 1),
        ("last segment sub type 1h", [desc(buf, 4096, 0)], seg, 16, 0x31, 8, 1),
        ("segment in a last segment", [desc(buf, 2048, 0), desc(seg2, 16, 0x20)], seg, 32, 0x30, 8, 1),
        ("last segment in a last segment", [desc(buf, 2048, 0), desc(seg2, 16, 0x30)], seg, 32, 0x30, 8, 1),
        ("bit bucket in a last segment", [desc(buf, 2048, 0), desc(0, 2048, 0x10)], seg, 32, 0x30, 8, 1),
        ("sub type 1h in a last segment", [desc(buf, 2048, 0), desc(buf, 2048, 0x01)], seg, 32, 0x30, 8, 1),
        ("keyed in a last segment", [desc(buf, 4096, 0x40)], seg, 16, 0x30, 8, 1),
        ("list shorter", [desc(buf, 2048, 0), desc(buf + 4096, 1024, 0)], seg, 32, 0x30, 8, 1),
        ("list longer", [desc(buf, 2048, 0), desc(buf + 4096, 4096, 0)], seg, 32, 0x30, 8, 1),
        ("list longer, then a bad type", [desc(buf, 8192, 0), desc(0, 1, 0x10)], seg, 32, 0x30, 8, 1),
        ("exact, then a bad type", [desc(buf, 4096, 0), desc(0, 1, 0x10)], seg, 32, 0x30, 8, 1),
        ("list data outside memory", [desc(buf, 2048, 0), desc(1 << 50, 2048, 0)], seg, 32, 0x30, 8, 1),
        ("list outside memory", None, 1 << 50, 32, 0x30, 8, 1),
        ("list across the end of memory", None, mem.iova + mem.size - 16, 32, 0x30, 8, 1),
        ("65536 descriptors", None, seg, 1 << 20, 0x30, 8, 1),
        ("1100 pieces (IOV_MAX)", None, big, 1100 * 16, 0x30, 1100, 1),
    ]
    out = []
    for name, entries, addr, n, ident, nlb, psdt in cases:
        for opc in (IoOpcode.READ, IoOpcode.WRITE):
            if entries is not None:
                mem.write(seg, b"".join(entries))
            mem.write(seg2, desc(buf + 2048, 2048, 0))
            if opc == IoOpcode.WRITE:
                mem.write(buf, data)
                mem.write(gapped, rng.randbytes(1100 * 1024))
            else:
                mem.write(buf, bytes(16384))
            cid = h.submit(1, opc, 1, addr, n | (ident << 56), cdw10=40, cdw12=nlb - 1, flags=psdt << 6)
            c = h.wait(1, cid)
            out.append((name, opc, c.sct, c.sc, mem.read(buf, 16384), h.read(1, 40, 1100).data))
    return out


def test_sgls_the_normal_path_fails_or_chains_complete_as_on_the_normal_path(emu: Any, path: str) -> None:
    results = []
    for p in ("off", path):
        fastpath.set_path(p)
        e, h = sealed_host(emu)
        before = (served(e)[path] if p != "off" else 0)
        results.append(_sgl_step_aside_cases(h))
        if p != "off":
            assert served(e)[path] == before + len(results[-1]) + 1  # only the PRP reads and write
        e.stop()
    fastpath.set_path(path)
    want, got = results
    assert [r[:4] for r in got] == [r[:4] for r in want]
    assert got == want
    statuses = {r[0]: (r[2], r[3]) for r in want}
    assert statuses["data block longer"] == (0, SglStatus.DATA_SGL_LENGTH_INVALID)
    assert statuses["list outside memory"] == (0, Generic.DATA_TRANSFER_ERROR)
    assert statuses["segment chain"] == statuses["PSDT 10b"] == statuses["1100 pieces (IOV_MAX)"] == (0, 0)
    assert statuses["exact, then a bad type"] == (0, SglStatus.SGL_DESCRIPTOR_TYPE_INVALID)


def test_mixed_sgl_commands_complete_in_sq_order(emu: Any, path: str) -> None:
    e, h = sealed_host(emu)
    mem = h.mem
    data = os.urandom(8192)
    buf, rbuf, rbuf2 = mem.alloc(8192), mem.alloc(8192), mem.alloc(8192)
    seg, seg2, seg3 = mem.alloc(4096), mem.alloc(4096), mem.alloc(4096)
    mem.write(buf, data)
    desc = lambda a, n, ident: struct.pack("<QI3xB", a, n, ident)  # noqa: E731
    mem.write(seg, desc(buf, 4096, 0) + desc(buf + 4096, 4096, 0))
    mem.write(seg2, desc(rbuf2, 4096, 0) + desc(seg3, 16, 0x30))  # a chain: normal path
    mem.write(seg3, desc(rbuf2 + 4096, 4096, 0))
    q = h.queues[1]
    sgl = 1 << 6
    cmds = [
        pack_sqe(IoOpcode.WRITE, cid=1, nsid=1, prp1=buf, prp2=8192, cdw10=100, cdw12=15, flags=sgl),
        pack_sqe(IoOpcode.READ, cid=2, nsid=1, prp1=seg2, prp2=32 | (0x20 << 56), cdw10=100, cdw12=15,
                 flags=sgl),
        pack_sqe(IoOpcode.WRITE, cid=3, nsid=1, prp1=seg, prp2=32 | (0x30 << 56), cdw10=200, cdw12=15,
                 flags=sgl),
        pack_sqe(IoOpcode.READ, cid=4, nsid=1, prp1=buf, prp2=4096, cdw10=100, cdw12=15, flags=sgl),
        pack_sqe(IoOpcode.READ, cid=5, nsid=1, prp1=rbuf, prp2=8192, cdw10=200, cdw12=15, flags=sgl),
    ]
    got = _one_doorbell(h, cmds)
    assert [c.cid for c in got] == [1, 2, 3, 4, 5]
    assert [c.sc for c in got] == [0, 0, 0, SglStatus.DATA_SGL_LENGTH_INVALID, 0]
    h.t.mmio_write(DOORBELL_BASE + 3 * 4, 4, q.cq_head)
    assert mem.read(rbuf, 8192) == mem.read(rbuf2, 8192) == data
    assert served(e)[path] == 3
    assert _sgl_count(e) == 4  # the chain too (the normal path); not the failed one


def test_cq_full_with_held_completions(emu: Any, path: str) -> None:
    e, h = sealed_host(emu, qsize=4)  # the CQ holds 3 entries
    q, mem = h.queues[1], h.mem
    data = os.urandom(512)
    assert h.write(1, 7, data).ok
    first = [h.submit(1, IoOpcode.READ, nsid=1, prp1=mem.alloc(4096), cdw10=7) for _ in range(3)]
    got: list[Any] = []
    while len(got) < 3:
        got += take_cqes_without_doorbell(h, 1)
    assert [c.cid for c in got] == first
    bufs = [mem.alloc(4096) for _ in range(3)]
    waiting = [h.submit(1, IoOpcode.READ, nsid=1, prp1=b, cdw10=7) for b in bufs]  # CQ full
    h.t.mmio_write(DOORBELL_BASE + (2 * 1 + 1) * 4, 4, q.cq_head)  # free the slots
    for cid, b in zip(waiting, bufs):
        assert h.wait(1, cid).ok
        assert mem.read(b, 512) == data
    assert served(e)[path] >= 3


def test_unmapped_queue_memory_waits_for_the_map(emu: Any, path: str) -> None:
    e, h = sealed_host(emu, qsize=16)
    data = os.urandom(8192)
    assert h.write(1, 100, data).ok
    split_ram(h, h.queues[1].cq_iova - h.mem.iova)  # SQ and CQ in different pieces now
    assert h.read(1, 100, 16).data == data
    q, mem = h.queues[1], h.mem
    bufs = [mem.alloc(4096) for _ in range(3)]
    h.t.client.dma_unmap(mem.iova, mem.size)
    cids = [h.submit(1, IoOpcode.READ, nsid=1, prp1=b, cdw10=100, cdw12=7) for b in bufs]
    h.t.client.dma_map(mem.iova, mem.size, fd=mem.fd, offset=0, flags=0x3)
    for cid, b in zip(cids, bufs):
        assert h.wait(1, cid).ok
        assert mem.read(b, 4096) == data[:4096]
    assert h.t.mmio_read(0x1C, 4) & 0x2 == 0
    assert served(e)[path] >= 3


def _workload(h: Any) -> None:
    for i in range(40):
        n = 1 + (i * 7) % 24
        assert h.write(1, (i * 997) % 30000, os.urandom(n * 512)).ok
        assert h.write(2, (i * 131) % 4000, os.urandom(4096), lba_size=4096).ok
    assert h.deallocate(1, [(0, 64)]).ok
    for i in range(10):
        assert h.read(1, i * 100, 8).ok
    for pieces in (1, 2, 3):  # SGLs: a Data Block, a Last Segment of 2 and 3 (sgl_commands)
        assert h.write(1, 5000 + pieces * 300, os.urandom(128 << 10), sgl=pieces).ok
        assert h.read(1, 5000 + pieces * 300, 256, sgl=pieces).ok


def _observed(e: Any, h: Any) -> tuple[Any, ...]:
    def grab() -> tuple[Any, ...]:
        sub = e.subsystem
        c = sub.controllers[1]
        bits = tuple(bytes(sub.namespaces[n].allocation.bits) for n in (1, 2))
        stats = {k: v for k, v in c.stats.items()}
        ops = {o: list(v) for o, v in c.cmd_stats.io.ops.items()}
        return bits, stats, ops, sum(c.cmd_stats.io.latency), c.xfer_bytes
    got = e.call(grab)
    lba = [scan(h, nsid) for nsid in (1, 2)]
    return got + (lba,)


def test_allocation_bitmap_stats_and_lba_status_equal_to_the_normal_path(emu: Any, path: str) -> None:
    results = []
    for p in (path, "off"):
        fastpath.set_path(p)
        e, h = sealed_host(emu)
        _workload(h)
        results.append(_observed(e, h))
        if p != "off":
            assert served(e)[p] > 0
        else:
            assert not any(served(e).values())
        # the sidecar holds what memory holds (write-through)
        def sidecar_equal() -> bool:
            sub = e.subsystem
            for n in (1, 2):
                amap = sub.namespaces[n].allocation
                raw = os.pread(amap.sidecar_fd, amap.bits.nbytes, 24)
                if raw != bytes(amap.bits):
                    return False
            return True
        assert e.call(sidecar_equal)
        e.stop()
    fastpath.set_path(path)
    assert results[0] == results[1]


def test_fallback_cases_are_served_by_the_normal_path(emu: Any, path: str) -> None:
    # unsealed memory: the guarded copies
    e = emu(CFG)
    h = e.host(memory=HostMemory(32 << 20, sealed=False))
    data = os.urandom(4096)
    assert h.write(1, 8, data).ok and h.read(1, 8, 8).data == data
    assert not any(served(e).values())
    # every write visible as a DMA_WRITE message
    e = emu(CFG, visible_writes="all")
    h = e.host(memory=HostMemory(32 << 20, sealed=True), serve_dma=True)
    assert h.write(1, 8, data).ok and h.read(1, 8, 8).data == data
    assert not any(served(e).values())
    # visible writes "boot" (the default): host memory above 1 MiB is written directly
    e, h = sealed_host(emu)
    assert h.write(1, 8, data).ok and h.read(1, 8, 8).data == data
    assert served(e)[path] == 2


def test_write_uncorrectable_marks_are_honoured(emu: Any, path: str) -> None:
    e, h = sealed_host(emu)
    data = os.urandom(4096)
    assert h.write(1, 0, data).ok
    assert h.command(1, IoOpcode.WRITE_UNCORRECTABLE, nsid=1, cdw10=2, cdw12=0).ok
    assert h.read(1, 0, 8).sct == 2  # Unrecovered Read Error
    assert h.write(1, 0, data).ok  # heals the mark
    assert h.read(1, 0, 8).data == data
    assert h.read(1, 0, 8).ok


def test_user_data_logging_falls_back(emu: Any, path: str) -> None:
    from emulator.host.lm import MigrationHost
    cfg = {"namespaces": [{"nsid": 1, "size": "16MiB"}],
           "controllers": [{"cntlid": 1, "type": "io", "namespaces": [1]},
                           {"cntlid": 2, "type": "mmc"}]}
    e = emu(cfg)
    g = e.host(1, memory=HostMemory(32 << 20, sealed=True))
    m = MigrationHost(e.host(2))
    q = m.udmq(1)
    assert g.write(1, 0, os.urandom(512)).ok  # not logging: fast
    before = served(e)[path]
    assert before >= 1
    assert m.log_start(q.cdqid).ok  # between two calls on the same controller
    assert g.write(1, 100, os.urandom(16 * 512)).ok
    assert served(e)[path] == before
    assert m.log_stop(q.cdqid).ok
    assert g.write(1, 200, os.urandom(512)).ok  # fast again, and not logged
    assert served(e)[path] == before + 1
    got = m.drain(q)
    assert [(x.nsid, x.slba, x.nlb) for x in got[1:-1]] == [(1, 100, 16)]


def test_admin_commands_and_resets_between_fast_batches(emu: Any, path: str) -> None:
    e, h = sealed_host(emu)
    data = os.urandom(4096)
    assert h.write(1, 0, data).ok
    assert h.admin(AdminOpcode.IDENTIFY, cdw10=1, read_len=4096).ok
    h.delete_io_queue_pair(1)
    h.create_io_queue_pair(1, qsize=8)
    for i in range(20):  # wraps the 8-entry queues
        assert h.read(1, 0, 8).data == data
    assert served(e)[path] >= 20


# The normal-path code whose semantics the fast path repeats (emulator/nvme/fastpath.py,
# fastpath_py.py).
# When one of these changes, check that the fast path still does the same (or hands the
# command over), then update its hash here.
MIRRORED = {
    "emulator.nvme.io_cmds:read": "22acac331e49",
    "emulator.nvme.io_cmds:write": "9bc3880ff9dd",
    "emulator.nvme.io_cmds:_rw_args": "e10034e83a2f",
    "emulator.nvme.io_cmds:_data_args": "5776d1bc114f",
    "emulator.nvme.namespace:Namespace.read_into": "3daabf5b7606",
    "emulator.nvme.namespace:Namespace.write_from": "a9b48f87462b",
    "emulator.nvme.allocation:AllocationMap.mark_allocated": "e21d99b8fc0f",
    "emulator.nvme.allocation:AllocationMap._write_through": "9938fd5fabb8",
    "emulator.nvme.controller:Controller.run_sq": "5631b55919a8",
    "emulator.nvme.controller:Controller.execute": "8733f874af82",
    "emulator.nvme.controller:Controller.complete": "4bf63357051a",
    "emulator.nvme.controller:Controller.data_segments": "ab16193fed02",
    "emulator.nvme.prp:prp_segments": "201bb9a86717",
    "emulator.nvme.sgl:sgl_segments": "4665a2797ea5",
    "emulator.nvme.queues:cq_post": "45f2612599c8",
    "emulator.nvme.sanitize:on_write": "dbcc03526529",
    "emulator.nvme.migration.udlog:on_write": "999ae6865588",
    "emulator.memory.mapped:MappedMemory._pieces": "1d5a32979da2",
}


def _source_hash(name: str) -> str:
    import hashlib
    import importlib
    import inspect
    mod, _, attr = name.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:12]


def test_the_mirrored_normal_path_code_is_unchanged() -> None:
    changed = {n: _source_hash(n) for n, h in MIRRORED.items() if _source_hash(n) != h}
    assert not changed, ("the fast path repeats what these do; check emulator/nvme/fastpath.py, "
                         f"fastpath_py.py and cbind/ioq.c against them, then update MIRRORED: {changed}")


def test_a_write_after_a_sanitize_clears_gde(emu: Any, path: str) -> None:
    """Sanitize Status GDE set: the Write that clears it goes to the normal path; later ones are fast."""
    e, h = sealed_host(emu)
    assert h.admin(0x84, cdw10=0x2).ok  # Sanitize, Block Erase
    sstat = lambda: struct.unpack_from("<HH", h.get_log_page(0x81, 512).data)[1]  # noqa: E731
    assert sstat() & (1 << 8)
    before = served(e)[path]
    assert h.write(1, 0, os.urandom(4096)).ok
    assert not sstat() & (1 << 8)
    assert served(e)[path] == before
    assert h.write(1, 8, os.urandom(4096)).ok
    assert served(e)[path] == before + 1


def test_memory_write_observers_see_every_write_so_the_fast_path_steps_aside(emu: Any, path: str) -> None:
    """Host memory dirty tracking (TP4159 Track Send SEL 1h) watches device writes through
    the memory's observers: while one is registered, Reads go to the normal path."""
    e, h = sealed_host(emu)
    data = os.urandom(4096)
    assert h.write(1, 0, data).ok
    seen: list[tuple[int, int]] = []
    watch = lambda addr, n: seen.append((addr, n))  # noqa: E731
    ctrl = e.subsystem.controllers[1]
    e.call(lambda: ctrl.memory.observers.append(watch))
    before = served(e)[path]
    assert h.read(1, 0, 8).data == data
    assert any(n == 4096 for _, n in seen) and served(e)[path] == before
    e.call(lambda: ctrl.memory.observers.remove(watch))
    assert h.read(1, 0, 8).data == data and served(e)[path] == before + 1


def test_no_mapping_of_guest_memory_outlives_the_client(emu: Any, path: str) -> None:
    """The fast path caches views of the mapped regions; when the client goes, they go
    too, so the guest's memfd is not kept mapped (and allocated) by the emulator."""
    name = f"fp-{path}-{os.getpid()}"

    def mappings() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for line in f if f"memfd:{name}" in line)
    e = emu(CFG)
    h = e.host(memory=HostMemory(8 << 20, sealed=True, name=name))
    assert h.read(1, 0, 8).ok and served(e)[path] == 1
    assert mappings() >= 2  # ours (the host's) and the emulator's
    h.close()  # disconnects: the controller's memory goes
    if h in e.hosts:
        e.hosts.remove(h)
    deadline = time.monotonic() + 10
    while mappings() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mappings() == 1


def test_no_mapping_outlives_a_dma_unmap(emu: Any, path: str) -> None:
    name = f"fpu-{path}-{os.getpid()}"

    def mappings() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for line in f if f"memfd:{name}" in line)
    e = emu(CFG)
    h = e.host(memory=HostMemory(8 << 20, sealed=True, name=name))
    assert h.read(1, 0, 8).ok and served(e)[path] == 1
    h.t.client.dma_unmap(h.mem.iova, h.mem.size)
    assert mappings() == 1  # the reply came after the unmap: only the host's own mapping is left
    h.t.client.dma_map(h.mem.iova, h.mem.size, fd=h.mem.fd, offset=0, flags=0x3)
    assert h.read(1, 0, 8).ok and served(e)[path] == 2
