"""``bench --insn`` end to end (emulator/guest/bench.py with emulator/guest/tcgprof.py):
one short fio job on each disk of a real guest, the plugin's counts cut 2 s after each
fio start, the guest's kallsyms read back from QEMU's disk, and a report that counts the
I/Os and names the NVMe driver's instructions for both devices."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from emulator.guest import bench
from emulator.guest.env import GuestEnv

pytestmark = pytest.mark.guest


def _row(text: str, label: str) -> list[float]:
    m = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)\s+([\d.]+)\s*$", text, re.M)
    assert m, f"no '{label}' row in:\n{text}"
    return [float(m.group(1)), float(m.group(2))]


def test_bench_insn_reports_instructions_per_io_for_both_devices(guest_env: GuestEnv, guest_workdir: Path) -> None:
    if not (shutil.which("cc") or shutil.which("gcc")):
        msg = "bench --insn builds its QEMU plugin with a C compiler: apt-get install gcc"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and no C compiler (guest tests never skip in CI): {msg}")
        pytest.skip(msg)
    reports: list[str] = []
    r = bench.run_bench(3, guest_workdir / "bench", rounds=1, jobs=["randread1_iops"], reports=reports,
                        insn=True)
    assert r["emu_randread1_iops"] > 0 and r["qemu_randread1_iops"] > 0, r
    text = reports[-1]
    assert "randread1_iops:" in text, text
    ios = _row(text, "I/Os counted")
    insns = _row(text, "instructions per I/O")
    driver = _row(text, "nvme driver")
    # the I/Os are aio_complete's calls over fio's last second or so: a few hundred at QD1
    # under TCG, for each device
    assert all(n >= 50 for n in ios), text
    # a 4 KiB QD1 read costs a TCG guest thousands of instructions, a few hundred of them
    # in the NVMe driver (both devices: the same Linux driver)
    assert all(3000 < n < 200000 for n in insns), text
    assert all(50 < n < 5000 for n in driver), text
    assert "kernel functions, instructions per I/O" in text
