"""Memory that shrinks under its mapping is a Data Transfer Error, never a SIGBUS.

A client may ftruncate its memfd after DMA_MAP, and anyone may truncate a
namespace's ``.alloc`` sidecar.  Loads and stores into the lost range would
raise SIGBUS and kill the process, so each attack runs in a child process:
the test fails (instead of taking pytest down) when the child dies by a
signal.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from emulator.nvme.spec import AdminOpcode, Generic, IoOpcode

HERE = Path(__file__).resolve().parent


def run_child_in(module: str, name: str, *args: str) -> None:
    """Run ``module.name(*args)`` in a fresh interpreter; it must exit 0 (not die of SIGBUS)."""
    code = (f"import sys; sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]; "
            f"import {module} as t; t.{name}(*{args!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert r.returncode != -signal.SIGBUS, f"killed by SIGBUS\n{r.stderr[-3000:]}"
    assert r.returncode == 0, r.stderr[-3000:]


def run_child(name: str) -> None:
    run_child_in("test_memory_faults", name)


def _shrunk_host_memory() -> None:
    from emu_fixture import Emu
    from emulator.host.memory import HostMemory
    e = Emu().start()
    try:
        h = e.host(memory=HostMemory(32 << 20, sealed=False))  # a memfd anybody may shrink
        half = h.mem.size // 2
        assert h.mem.alloc(4096) < h.mem.iova + half  # the driver's queues and buffers sit low
        os.ftruncate(h.mem.fd, half)  # the attack: shrink the memfd after DMA_MAP
        lost = h.mem.iova + half + 0x10000
        dte = (0, Generic.DATA_TRANSFER_ERROR)
        c = h.admin(AdminOpcode.IDENTIFY, cdw10=1, prp1=lost)  # Identify data into the lost range
        assert (c.sct, c.sc) == dte
        for opc in (IoOpcode.READ, IoOpcode.WRITE):  # data straight from/to the lost range
            c = h.command(1, opc, nsid=1, prp1=lost, cdw12=7)
            assert (c.sct, c.sc) == dte, opc
        buf = h.mem.alloc(4096)
        c = h.command(1, IoOpcode.READ, nsid=1, prp1=buf, prp2=lost, cdw12=31)  # PRP list in the lost range
        assert (c.sct, c.sc) == dte
        c = h.command(1, IoOpcode.DATASET_MANAGEMENT, nsid=1, prp1=lost, cdw11=4)  # ranges from the lost range
        assert (c.sct, c.sc) == dte
        assert h.write(1, 0, b"\x5a" * 512).ok and h.read(1, 0, 1).data == b"\x5a" * 512
    finally:
        e.cleanup()


def _truncated_sidecar() -> None:
    from emu_fixture import Emu
    e = Emu().start()
    try:
        h = e.host()
        assert h.write(1, 0, b"\x11" * 4096).ok
        sidecar = Path(str(e.call(lambda: e.subsystem.namespaces[1].path)) + ".alloc")
        os.truncate(sidecar, 0)  # a third party truncates the bitmap under the emulator
        assert h.write(1, 1 << 16, b"\x22" * 4096).ok
        assert h.deallocate(1, [(0, 4096)]).ok
        assert h.flush(1).ok
        assert h.read(1, 1 << 16, 8).data == b"\x22" * 4096
    finally:
        e.cleanup()


def test_client_shrinks_its_memfd_after_dma_map() -> None:
    run_child("_shrunk_host_memory")


def test_third_party_truncates_the_alloc_sidecar() -> None:
    run_child("_truncated_sidecar")


def test_guarded_and_sealed_regions() -> None:
    """MappedMemory reads/writes through the kernel unless the memfd is sealed against shrinking."""
    import fcntl

    from emulator.memory import DmaError, MappedMemory
    mem = MappedMemory()
    loose = os.memfd_create("loose", os.MFD_ALLOW_SEALING)
    sealed = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
    for fd in (loose, sealed):
        os.ftruncate(fd, 1 << 16)
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    a = mem.add(0x10000, 1 << 16, loose)
    b = mem.add(0x20000, 1 << 16, sealed)
    assert a.guarded and not b.guarded
    mem.write(0x1FFF0, bytes(range(32)))  # crosses from the guarded into the sealed region
    assert mem.read(0x1FFF0, 32) == bytes(range(32))
    os.ftruncate(loose, 0x8000)
    for bad in (lambda: mem.read(0x18000, 16), lambda: mem.write(0x1F000, b"x")):
        try:
            bad()
        except DmaError:
            pass
        else:
            raise AssertionError("no DmaError past the end of the shrunk file")
    assert mem.read(0x17FF0, 16) == bytes(16)
    mem.clear()
    os.close(loose)
    os.close(sealed)
