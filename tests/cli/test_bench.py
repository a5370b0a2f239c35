"""`nvme-emu bench` (issue 12): the host-side load generator runs its jobs against a
`nvme-emu serve` child without errors and reports the emulator's CPU time per I/O.
No timing is asserted: the figures are only checked to be there."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from emulator.guest import bench as guest_bench
from emulator.guest import benchwatch

REPO = Path(__file__).resolve().parents[2]


def test_bench_runs_jobs_and_reports_cpu_per_io() -> None:
    out = subprocess.run([sys.executable, "-m", "emulator", "bench", "--seconds", "0.3",
                          "--size", "8MiB", "--jobs", "4k-read-qd1,4k-write-qd32,4k-read-4q-qd8",
                          "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert [j["name"] for j in r["jobs"]] == ["4k-read-qd1", "4k-write-qd32", "4k-read-4q-qd8"]
    for j in r["jobs"]:
        assert j["ios"] > 0 and j["errors"] == 0
        assert j["emu_cpu_us_per_io"] >= 0 and j["iops"] > 0
    assert set(r["limits"]) == {"memcpy_us", "memcpy_net_us", "preadv_us", "preadv_net_us"}


def test_bench_paths_side_by_side_and_the_fast_path_alone() -> None:
    from cbind import ioq
    out = subprocess.run([sys.executable, "-m", "emulator", "bench", "--seconds", "0.3",
                          "--size", "8MiB", "--jobs", "4k-write-qd32", "--path", "all", "--batch", "8",
                          "--inproc", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    paths = ["c", "python", "off"] if ioq.LIB is not None else ["python", "off"]
    assert [j["path"] for j in r["jobs"]] == paths
    assert all(j["ios"] > 0 and j["errors"] == 0 for j in r["jobs"])
    assert list(r["run_sq_us"]) == paths
    assert all(set(v) == {"read", "write"} for v in r["run_sq_us"].values())


def test_inproc_128k_shapes() -> None:
    """--inproc-128k's command shapes (PRPs, an SGL Data Block, a Last Segment of two) run
    (the end-to-end 128 KiB jobs: tests/cli/test_iocount.py)."""
    from emulator.host.fastbench import SHAPES, run_sq_us_per_command
    for shape in SHAPES:
        got = run_sq_us_per_command(["python"], count=4, rounds=1, size="8MiB", shape=shape)
        assert set(got["python"]) == {"read", "write"}


def test_bench_unknown_job_is_an_error() -> None:
    out = subprocess.run([sys.executable, "-m", "emulator", "bench", "--jobs", "nope"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no job" in out.stderr


def test_guest_bench_job_lines_and_report() -> None:
    keys = [k for k, _label, _args in guest_bench.JOBS]
    lines = guest_bench._job_lines(keys).splitlines()
    assert len(lines) == len(keys) == len(set(keys))
    assert all(k.endswith(("_iops", "_kibs")) for k in keys)
    assert any("--rwmixread=70" in line and "--iodepth=8" in line for line in lines)
    table = guest_bench.report({"qemu_randread1_iops": 100.0, "emu_randread1_iops": 150.0})
    assert "QD1" in table and "1.50" in table and "QD32" not in table


def test_guest_bench_pairs_each_round() -> None:
    """The paired ratio: each round's two runs (back to back) divided, then the median."""
    res = {"emu_randread1_iops_1": "200", "qemu_randread1_iops_1": "100",
           "emu_randread1_iops_2": "90", "qemu_randread1_iops_2": "100",
           "emu_randread1_iops_3": "120", "qemu_randread1_iops_3": "100",
           "emu_randread1_iops_gbusy_1": "900", "qemu_randread1_iops_4": "100",
           "emu_randread_iops_1": "x", "qemu_randread_iops_1": "0"}
    p = guest_bench.paired(res, ["randread1_iops", "randread_iops", "seqread_kibs"])
    assert p == {"pair_randread1_iops": 1.2, "pairlo_randread1_iops": 0.9,
                 "pairhi_randread1_iops": 2.0}
    table = guest_bench.report({"qemu_randread1_iops": 100.0, "emu_randread1_iops": 120.0, **p})
    assert "1.20    1.20  0.90-2.00" in table


def test_guest_bench_reports_the_guest_side() -> None:
    r = {"qemu_randread_iops": 5000.0, "emu_randread_iops": 7500.0,
         "qemu_randread_iops_gbusy": 950.0, "emu_randread_iops_gbusy": 940.0,
         "qemu_randread_iops_girq": 25000.0, "emu_randread_iops_girq": 15000.0,
         "emu_randread_iops_shared": 12.0, "qemu_randread_iops_vwait": 1.5,
         "emu_randread_iops_vwait": 7.25, "qemu_randread_iops_vrun": 90.0,
         "emu_randread_iops_vrun": 89.0}
    table = guest_bench.report(r, runtime=4)
    assert "guest side" in table
    line = [s for s in table.splitlines() if s.startswith("fio 4 KiB randread QD32")][-1]
    # busy in % of the job's wall time; interrupts per I/O over runtime + the 1 s ramp; the
    # vCPU and the emulator's loop on one host CPU in % of the samples
    # vCPU thread waiting for a host CPU, and running, in % of the job
    assert line.split()[-9:] == ["95.0", "94.0", "1.000", "0.400", "12", "1.5", "7.2", "90.0", "89.0"]
    assert "guest side" not in guest_bench.report({"qemu_randread_iops": 1.0}, runtime=4)


def test_guest_bench_shell_helpers_parse_proc() -> None:
    """The guest script's /proc readers, run by this machine's sh and awk on its own /proc."""
    body = guest_bench.BODY
    funcs = body[body.index("cpu_busy() {"):body.index("fio_job() {")]
    out = subprocess.run(["sh", "-c", funcs + "cpu_busy; dev_irqs /dev/nvme99n1"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    busy, total, irqs = out.stdout.split()
    assert 0 < int(busy) <= int(total) and irqs == "0"


def test_guest_bench_placement_sampler_reads_proc() -> None:
    """The placement sampler on this process (as both 'QEMU' and 'emulator'): its main
    thread is always on its own CPU, and schedstat gives it some run time."""
    import os
    import time
    p = benchwatch.Placement(os.getpid(), os.getpid(), period=0.002).start()
    deadline = time.monotonic() + 10
    while p.counts["place.samples"] < 3 and time.monotonic() < deadline:
        sum(range(10000))  # keep the main thread running a little
        time.sleep(0.002)
    p.stop()
    got = p.sample()
    assert got["place.samples"] >= 3 and got["place.shared"] == got["place.samples"]
    assert got["place.vcpu_run_ns"] > 0
