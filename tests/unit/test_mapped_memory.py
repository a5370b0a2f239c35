"""MappedMemory map/unmap semantics (VFIO type1 cuts; unmapped-by-the-client vs never mapped)."""
from __future__ import annotations

import os

import pytest

from emulator.memory import DmaError, MappedMemory

MIB = 1 << 20


@pytest.fixture
def mem():
    fd = os.memfd_create("mapped-memory-test")
    os.ftruncate(fd, 4 * MIB)
    m = MappedMemory()
    m.add(0, 4 * MIB, fd)
    m.write(0x1000, b"low")
    m.write(3 * MIB, b"high")
    yield m, fd
    m.clear()
    os.close(fd)


def _error(m: MappedMemory, addr: int) -> DmaError:
    with pytest.raises(DmaError) as e:
        m.read(addr, 4)
    return e.value


def test_unmap_cuts_the_map_and_leaves_the_rest(mem):
    m, fd = mem
    assert m.remove(MIB, MIB)                       # the middle of one map
    assert [(r.iova, r.size) for r in m.regions()] == [(0, MIB), (2 * MIB, 2 * MIB)]
    assert m.read(0x1000, 3) == b"low" and m.read(3 * MIB, 4) == b"high"
    assert _error(m, MIB + 8).unmapped               # the client unmapped it: may come back
    assert not _error(m, 8 * MIB).unmapped           # never mapped: a host error
    m.add(MIB, MIB, fd, MIB, writable=False)         # QEMU maps the new piece
    assert m.read(MIB, 4) == bytes(4)
    with pytest.raises(DmaError):
        m.write(MIB, b"x")                           # read-only now, not the old read-write map
    assert m.remove(0, 4 * MIB)                      # one range over three maps
    assert m.regions() == [] and _error(m, 0).unmapped
    assert not m.remove(0, 4 * MIB)


def test_map_over_a_map_is_refused(mem):
    m, fd = mem
    with pytest.raises(FileExistsError):
        m.add(MIB, 4096, fd, 0)
    assert m.read(0x1000, 3) == b"low"
