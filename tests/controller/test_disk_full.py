"""A full file system under the namespaces: Capacity Exceeded, never 06h, never a crash.

The state directory is a small tmpfs mounted for the test (root only).  Each
scenario runs in a child process, so a SIGBUS fails the test instead of
killing pytest.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from test_memory_faults import run_child_in

HERE = Path(__file__).resolve().parent
NS_SIZE = 1 << 30  # 1 GiB of 512-byte LBAs: a 32 KiB bitmap (8 pages) at 4 KiB granules


@pytest.fixture
def small_fs() -> object:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (run the suite as root, as CI does)")
    d = tempfile.mkdtemp(prefix="ne-full-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", d], capture_output=True, text=True)
    if r.returncode:
        os.rmdir(d)
        pytest.skip(f"mount -t tmpfs failed: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", d], check=False)
    shutil.rmtree(d, ignore_errors=True)


def _fill_then_deallocate(state_dir: str) -> None:
    from emu_fixture import Emu
    from emulator.nvme.spec import Generic
    config = {"namespaces": [{"nsid": 1, "size": NS_SIZE, "lba_size": 512}], "controllers": [{"cntlid": 1}]}
    e = Emu(config, Path(state_dir)).start()
    try:
        h = e.host()
        written = []
        status = None
        for i in range(4096):  # 4 KiB at a time, 1 MiB apart: each needs a new tmpfs page
            c = h.write(1, i * 2048, bytes([i % 251 + 1]) * 4096)
            if not c.ok:
                status = (c.sct, c.sc)
                break
            written.append(i)
        assert status == (0, Generic.CAPACITY_EXCEEDED), status
        assert written, "nothing could be written at all"
        # Deallocate far away (untouched bitmap pages) and where data is: no SIGBUS, success.
        last = (NS_SIZE // 512) - 8
        assert h.deallocate(1, [(last - 4096, 4096)]).ok
        assert h.write_zeroes(1, last - 64, 8, deac=True).ok
        assert h.deallocate(1, [(i * 2048, 8) for i in written[:4]]).ok
        assert h.flush(1).ok
        # Space came back: writes succeed again, and the data written before is intact.
        assert h.write(1, written[0] * 2048, b"\x77" * 4096).ok
        for i in written[4:8]:
            assert h.read(1, i * 2048, 8).data == bytes([i % 251 + 1]) * 4096
    finally:
        e.stop()


def test_full_file_system(small_fs: str) -> None:
    run_child_in("test_disk_full", "_fill_then_deallocate", small_fs)


def _format_on_full_fs(state_dir: str) -> None:
    from emu_fixture import Emu
    from emulator.nvme.spec import Generic
    config = {"namespaces": [{"nsid": 1, "size": "4MiB", "lba_size": 512},
                             {"nsid": 2, "size": "4MiB", "lba_size": 512}],
              "controllers": [{"cntlid": 1, "namespaces": [1, 2]}]}
    e = Emu(config, Path(state_dir)).start()
    try:
        h = e.host()

        def fill() -> list[int]:
            written = []
            for i in range(1024):  # namespace 2, 4 KiB at a time, until the file system is full
                c = h.write(2, i * 8, bytes([i % 251 + 1]) * 4096)
                if not c.ok:
                    assert (c.sct, c.sc) == (0, Generic.CAPACITY_EXCEEDED), c
                    return written
                written.append(i)
            raise AssertionError("the file system never filled up")

        written = fill()
        # The first change of the namespace registry on a full file system: Capacity Exceeded.
        c = h.format_nvm(1, lbaf=0, ses=1)
        assert (c.sct, c.sc) == (0, Generic.CAPACITY_EXCEEDED), c
        assert h.deallocate(2, [(i * 8, 8) for i in written[-16:]]).ok
        assert h.format_nvm(1, lbaf=0, ses=1).ok  # room again: the registry (and its spare) stored
        written = written[:-16] + fill()
        # What the soak found (Format NVM cdw10 0x62d98210 after ~80 rounds had filled the file
        # system): the registry is rewritten into its reserved spare, no block needed.
        assert h.format_nvm(1, lbaf=0, ses=1).ok
        assert h.format_nvm(1, lbaf=1, ses=0).ok
        c = h.write(1, 0, b"\x55" * 4096, lba_size=4096)  # in the new format (or refused: still full)
        assert c.ok or (c.sct, c.sc) == (0, Generic.CAPACITY_EXCEEDED), c
        e.restart()
        h = e.host()
        assert h.identify(cns=0, nsid=1)[26] & 0xF == 1  # the 4 KiB format survived the restart
        for i in written[:8] + written[-8:]:
            assert h.read(2, i * 8, 8).data == bytes([i % 251 + 1]) * 4096
    finally:
        e.stop()


def test_format_on_a_full_file_system(small_fs: str) -> None:
    run_child_in("test_disk_full", "_format_on_full_fs", small_fs)
