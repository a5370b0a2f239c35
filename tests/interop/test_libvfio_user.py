"""Interop with libvfio-user, the reference vfio-user implementation: nvme-emu's
VMM-style client migrates the device of libvfio-user's sample server between two
sample-server processes, as libvfio-user's own sample client does.

The sample device's state is its BAR1 (16 KiB, written by the "guest") and a
timer deadline in BAR0; its stop-copy data is the whole state, so (like its
sample client) the pre-copy data is read and dropped.  Exercised: VERSION,
DMA_MAP of the VM RAM memfd, DMA logging start/report/stop, PRE_COPY and
STOP_COPY reads (the last reply padded to the requested length, ``size``
giving the real length), RESUMING writes with argsz = 8 + size, and the
destination running with the source's BAR1."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from emulator.host.vmm import VmRam, get_state, migrate_device
from emulator.vfio_user.client import VfioUserClient
from emulator.vfio_user.migration import MigState
from libvfio_user_build import sample_server

BAR0, BAR1, BAR1_SIZE = 0, 1, 0x4000


@pytest.fixture(scope="module")
def server_binary() -> Path:
    return sample_server()


@pytest.fixture
def two_servers(server_binary: Path) -> Iterator[list[str]]:
    d = Path(tempfile.mkdtemp(prefix="lvu-"))
    paths = [str(d / f"{n}.sock") for n in "ab"]
    procs = [subprocess.Popen([str(server_binary), "-v", path], stdout=open(d / f"{n}.log", "w"),
                              stderr=subprocess.STDOUT) for n, path in zip("ab", paths)]
    try:
        deadline = time.monotonic() + 30
        while not all(os.path.exists(p) for p in paths):
            assert all(p.poll() is None for p in procs), "a sample server exited at start-up"
            assert time.monotonic() < deadline, "sample servers did not start"
            time.sleep(0.01)
        yield paths
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def test_vmm_client_migrates_the_sample_server_device(two_servers: list[str]) -> None:
    a, b = two_servers
    ram = VmRam(1 << 20)
    src = VfioUserClient(a, timeout=10)
    try:
        caps = src.negotiate()
        assert "migration" in caps  # the sample server offers migration
        src.dma_map(ram.iova, ram.size, fd=ram.fd, offset=0, flags=3)
        src.device_info()
        state = os.urandom(BAR1_SIZE)
        src.region_write(BAR1, 0, state)
        src.region_write(BAR0, 0, int(time.time() + 30).to_bytes(8, "little"))  # its timer deadline
        dst, new_ram, rep = migrate_device(src, ram, b, lambda: src.region_write(BAR1, 0, state),
                                           precopy_to_destination=False)
        try:
            assert rep.stream_bytes_stop_copy == BAR1_SIZE + 8  # BAR1 and the time_t of BAR0
            assert get_state(dst) == MigState.RUNNING and get_state(src) == MigState.STOP
            assert dst.region_read(BAR1, 0, BAR1_SIZE) == state
        finally:
            dst.close()
            new_ram.close()
    finally:
        src.close()
        ram.close()
