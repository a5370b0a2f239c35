"""The TLBAAG allocation bitmap against a naive set-of-granules model (issue 4, TP4165)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cbind import fileops
from emulator.nvme import allocation
from emulator.nvme.allocation import AllocationMap, data_extents


class Model:
    """The rules, spelled out: a write allocates every granule it touches; a deallocation
    clears the granules it covers whole (the short last granule is covered when it reaches NSZE)."""

    def __init__(self, nsze: int, tlbaag: int) -> None:
        self.nsze, self.t = nsze, tlbaag
        self.granules = -(-nsze // tlbaag)
        self.set: set[int] = set()

    def allocate(self, slba: int, nlb: int) -> None:
        self.set.update(range(slba // self.t, (slba + nlb - 1) // self.t + 1))

    def deallocate(self, slba: int, nlb: int) -> None:
        for g in range(self.granules):
            lo, hi = g * self.t, min((g + 1) * self.t, self.nsze)
            if slba <= lo and hi <= slba + nlb:
                self.set.discard(g)

    def runs(self, g0: int, g1: int) -> list[list[int]]:
        out: list[list[int]] = []
        for g in sorted(x for x in self.set if g0 <= x < g1):
            if out and out[-1][1] == g:
                out[-1][1] += 1
            else:
                out.append([g, g + 1])
        return out

    def lbas(self) -> int:
        return sum(min((g + 1) * self.t, self.nsze) - g * self.t for g in self.set)


@st.composite
def scenarios(draw: st.DrawFn, max_lbas: int = 3000) -> tuple[int, int, list[tuple[bool, int, int]]]:
    tlbaag = draw(st.sampled_from([1, 2, 3, 8, 64, 100]))
    nsze = draw(st.integers(1, max_lbas))
    ops = []
    for _ in range(draw(st.integers(0, 25))):
        slba = draw(st.integers(0, nsze - 1))
        nlb = draw(st.integers(1, nsze - slba))
        ops.append((draw(st.booleans()), slba, nlb))
    return nsze, tlbaag, ops


def apply(amap: AllocationMap, model: Model, ops: list[tuple[bool, int, int]]) -> None:
    for alloc, slba, nlb in ops:
        if alloc:
            amap.mark_allocated(slba, nlb)
            model.allocate(slba, nlb)
        else:
            amap.mark_deallocated(slba, nlb)
            model.deallocate(slba, nlb)


def check(amap: AllocationMap, model: Model, g0: int, g1: int, max_runs: int | None) -> None:
    want = model.runs(g0, g1)
    got, more = amap.runs(g0, g1, max_runs=max_runs)
    if max_runs is None:
        assert got.tolist() == want and not more
    else:
        assert got.tolist() == want[:max_runs]
        assert more == (len(want) > max_runs)


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.data())
def test_bitmap_matches_the_model(scenario, data) -> None:
    nsze, tlbaag, ops = scenario
    amap, model = AllocationMap.in_memory(nsze, tlbaag), Model(nsze, tlbaag)
    apply(amap, model, ops)
    assert amap.allocated_granules() == len(model.set)
    assert amap.allocated_lbas() == model.lbas()
    assert [amap.is_allocated(g) for g in range(model.granules)] == \
        [g in model.set for g in range(model.granules)]
    check(amap, model, 0, model.granules, None)
    g0 = data.draw(st.integers(0, model.granules))
    g1 = data.draw(st.integers(g0, model.granules + 5))
    check(amap, model, g0, g1, data.draw(st.one_of(st.none(), st.integers(0, 6))))
    # padding bits past the last granule stay clear
    if model.granules % 64:
        assert int(amap.words[-1]) >> (model.granules % 64) == 0


@settings(max_examples=100, deadline=None)
@given(scenarios(max_lbas=40000), st.data())
def test_scans_across_word_and_chunk_boundaries(scenario, data) -> None:
    """Tiny scan chunks so that runs cross chunks, words and the chunk-size doubling."""
    nsze, tlbaag, ops = scenario
    with mock.patch.object(allocation, "_SCAN_FIRST_WORDS", 1), \
            mock.patch.object(allocation, "_SCAN_MAX_WORDS", 4):
        amap, model = AllocationMap.in_memory(nsze, tlbaag), Model(nsze, tlbaag)
        apply(amap, model, ops)
        g0 = data.draw(st.integers(0, model.granules))
        g1 = data.draw(st.integers(g0, model.granules))
        for max_runs in (None, 0, 1, 2, 5):
            check(amap, model, g0, g1, max_runs)


def test_dense_and_alternating_words() -> None:
    amap = AllocationMap.in_memory(64 * 1000, 1)
    amap.mark_allocated(0, 64 * 1000)
    assert amap.runs(0, amap.granules)[0].tolist() == [[0, 64000]]
    assert amap.runs(130, 64 * 999 + 3)[0].tolist() == [[130, 64 * 999 + 3]]
    amap.mark_deallocated(64 * 500, 64)
    assert amap.runs(0, amap.granules)[0].tolist() == [[0, 32000], [32064, 64000]]
    amap.words[:] = np.uint64(0x5555_5555_5555_5555)
    runs, more = amap.runs(0, amap.granules, max_runs=1000)
    assert runs.tolist() == [[2 * k, 2 * k + 1] for k in range(1000)] and more
    assert amap.allocated_granules() == 32000


def test_one_bit_per_granule() -> None:
    nsze = (1 << 40) // 512  # 1 TiB of 512-byte LBAs, TLBAAG 8: 2^28 granules
    assert AllocationMap.in_memory(nsze, 8).memory_bytes == (1 << 28) // 8
    assert AllocationMap.in_memory(100, 8).memory_bytes == 8  # 13 bits, one word


# -- persistence -----------------------------------------------------------------------------
LBA = 512


def open_ns(path: Path, nsze: int, tlbaag: int = 8) -> tuple[int, AllocationMap]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, nsze * LBA)
    return fd, AllocationMap.open(path, nsze, tlbaag, fd, LBA)


def runs(amap: AllocationMap) -> list[list[int]]:
    return amap.runs(0, amap.granules)[0].tolist()


def write(fd: int, amap: AllocationMap, slba: int, data: bytes) -> None:
    """What Namespace.write_from does: the data, then the bits."""
    os.pwrite(fd, data, slba * LBA)
    amap.mark_allocated(slba, -(-len(data) // LBA))


def reopened(path: Path, nsze: int, tlbaag: int = 8) -> list[list[int]]:
    fd, amap = open_ns(path, nsze, tlbaag)
    os.close(fd)
    return runs(amap)


def test_sidecar_survives_reopen_exactly(tmp_path: Path) -> None:
    path = tmp_path / "ns.img"
    fd, amap = open_ns(path, 4096)
    write(fd, amap, 10, b"x" * LBA)
    fileops.zero_range(fd, 800 * LBA, 64 * LBA)  # Write Zeroes without DEAC: no data extent
    amap.mark_allocated(800, 64)
    write(fd, amap, 2000, b"y" * 4096)
    fileops.punch_hole(fd, 2000 * LBA, 4096)
    amap.mark_deallocated(2000, 8)
    os.pwrite(fd, b"z" * 4096, 3000 * LBA)  # data whose bit was never set ...
    amap.save()
    os.close(fd)
    before = runs(amap)
    assert before == [[1, 2], [100, 108]]
    # ... the sidecar is valid, and nonzero data in a clear granule is a write it missed
    assert reopened(path, 4096) == before + [[375, 376]]


def test_sub_block_deallocation_stays_deallocated(tmp_path: Path) -> None:
    path = tmp_path / "ns.img"
    fd, amap = open_ns(path, 4096, tlbaag=1)  # granule = 512 bytes < the 4 KiB fs block
    write(fd, amap, 0, b"d" * 4096)
    fileops.punch_hole(fd, 2 * LBA, 2 * LBA)  # zeroes inside a block that stays data
    amap.mark_deallocated(2, 2)
    amap.save()
    os.close(fd)
    assert runs(amap) == [[0, 2], [4, 8]]
    assert reopened(path, 4096, tlbaag=1) == [[0, 2], [4, 8]]


def test_stale_sidecar_recovers_written_granules(tmp_path: Path) -> None:
    """A machine crash: the sidecar on disk is older than the data (never flushed)."""
    path = tmp_path / "ns.img"
    fd, amap = open_ns(path, 8192)
    write(fd, amap, 0, b"a" * 4096)
    amap.save()
    shutil.copy(str(path) + ".alloc", tmp_path / "old.alloc")
    write(fd, amap, 4000, b"b" * LBA)  # nonzero: recoverable from the data
    write(fd, amap, 6000, bytes(4096))  # zeroes: reads the same as deallocated
    os.close(fd)
    shutil.copy(tmp_path / "old.alloc", str(path) + ".alloc")
    assert reopened(path, 8192) == [[0, 1], [500, 501]]


def test_stale_sidecar_with_granules_bigger_than_a_read(tmp_path: Path) -> None:
    path = tmp_path / "ns.img"
    nsze, tlbaag = 4 * 8192, 4096  # 2 MiB granules: checked one at a time
    fd, amap = open_ns(path, nsze, tlbaag)
    amap.save()
    shutil.copy(str(path) + ".alloc", tmp_path / "old.alloc")
    write(fd, amap, 2 * tlbaag - 1, b"b" * LBA)  # last LBA of granule 1
    write(fd, amap, 3 * tlbaag, bytes(8192))  # zeroes in granule 3
    os.close(fd)
    shutil.copy(tmp_path / "old.alloc", str(path) + ".alloc")
    assert reopened(path, nsze, tlbaag) == [[1, 2]]


def test_missing_or_mismatched_sidecar_is_rebuilt_from_extents(tmp_path: Path) -> None:
    path = tmp_path / "ns.img"
    fd, amap = open_ns(path, 8192)
    os.pwrite(fd, b"a" * 8192, 64 * LBA)
    os.pwrite(fd, bytes(4096), 1024 * LBA)  # written zeroes are data extents too
    os.close(fd)
    os.unlink(str(path) + ".alloc")
    assert reopened(path, 8192) == [[8, 10], [128, 129]]
    # TLBAAG changed: the sidecar is rebuilt
    assert reopened(path, 8192, tlbaag=16) == [[4, 5], [64, 65]]


def test_untrustworthy_seek_data_keeps_the_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "ns.img"
    fd, amap = open_ns(path, 8192)
    write(fd, amap, 0, b"a" * 4096)
    amap.save()
    os.close(fd)
    # "all data": what a file system without SEEK_DATA support answers
    with mock.patch.object(allocation, "data_extents", lambda fd, size: iter([(0, size)])):
        assert reopened(path, 8192) == [[0, 1]]


def test_data_extents(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 1 << 20)
    os.pwrite(fd, b"q", 65536)
    os.pwrite(fd, b"q", (1 << 20) - 1)
    assert list(data_extents(fd, 1 << 20)) == [(65536, 65536 + 4096), ((1 << 20) - 4096, 1 << 20)]
    assert list(data_extents(fd, 65536)) == []
    os.close(fd)


KILL = textwrap.dedent("""
    import os, signal
    from pathlib import Path
    from emulator.nvme.allocation import AllocationMap
    path = Path({path!r})
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 8192 * 512)
    amap = AllocationMap.open(path, 8192, 8, fd, 512)
    amap.mark_allocated(100, 1)       # bit only (Write Zeroes without DEAC: no data extent)
    amap.mark_allocated(0, 8192)
    amap.mark_deallocated(16, 4000)   # granules 2..501 cleared
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_process_killed_without_flush_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ns.img"
    proc = subprocess.run([sys.executable, "-c", KILL.format(path=str(path))], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert reopened(path, 8192) == [[0, 2], [502, 1024]]


@pytest.mark.parametrize("tlbaag", [1, 8, 3])
def test_short_last_granule(tlbaag: int) -> None:
    amap = AllocationMap.in_memory(10, tlbaag)
    amap.mark_allocated(9, 1)
    assert amap.allocated_lbas() == 10 - (9 // tlbaag) * tlbaag
    amap.mark_deallocated(9, 1)  # reaches NSZE: the short last granule is covered
    assert amap.allocated_granules() == (0 if tlbaag in (1, 3) else 1)


def test_write_through_persists_every_update(tmp_path: Path) -> None:
    """The sidecar is written through (not mapped): after random updates, including huge sparse
    deallocations and scattered single granules, a reopened map holds exactly the same bits."""
    import random
    rng = random.Random(7)
    nsze = 1 << 24
    fd, amap = open_ns(tmp_path / "wt.img", nsze)
    for _ in range(400):
        slba = rng.randrange(nsze)
        nlb = rng.choice([1, 8, 100, 5000, rng.randrange(1, nsze - slba + 1)])
        nlb = min(nlb, nsze - slba)
        (amap.mark_allocated if rng.random() < 0.6 else amap.mark_deallocated)(slba, nlb)
    expected = amap.bits.copy()
    amap.close()
    again = AllocationMap.open(tmp_path / "wt.img", nsze, 8, fd, LBA)
    assert (again.bits == expected).all()
    again.close()
    os.close(fd)
