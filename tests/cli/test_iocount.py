"""emulator/bench/iocount.py (issue 12): `nvme-emu serve` with its I/O counters, read over
the control socket, and the guest benchmark's --count table; no guest, no timing."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from emulator.bench import iocount
from emulator.control import ControlClient
from emulator.guest import bench as guest_bench
from emulator.guest import benchwatch
from emulator.guest.jobcpu import JobSamples
from emulator.host.loadgen import connect
from emulator.nvme.spec import IoOpcode

REPO = Path(__file__).resolve().parents[2]


def _serve_and_drive(extra: list[str], drive: Any, sealed: bool = True) -> tuple[dict[str, int], dict[str, Any]]:
    """`nvme-emu serve` under iocount; ``drive(host)`` does I/O; the counters' change and
    the last snapshot."""
    d = Path(tempfile.mkdtemp(prefix="ne-ioc-"))
    cfg = {"state_dir": str(d), "namespaces": [{"nsid": 1, "size": "8MiB", "lba_size": 512}],
           "controllers": [{"cntlid": 1, "socket": "c.sock"}]}
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.Popen([sys.executable, "-m", "emulator.bench.iocount", "serve", str(d / "c.yaml"),
                          "--log-level", "WARNING", *extra], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        assert line.startswith("listening on "), line
        host = connect(line[len("listening on "):], queues=1, qsize=64, sealed=sealed)
        with ControlClient(str(d / "control.sock")) as c:
            before = c.call("debug.iocount")["counts"]
            drive(host)
            snap = c.call("debug.iocount")
        host.close()
    finally:
        p.terminate()
        p.wait(30)
    return iocount.delta(snap["counts"], before), snap


def test_counts_doorbells_interrupts_and_why_commands_left_the_fast_path() -> None:
    data = bytes(range(256)) * 16

    def drive(host: Any) -> None:
        for slba in (0, 8, 16):
            assert host.write(1, slba, data, check=True).ok
            assert host.read(1, slba, 8, check=True).ok
        # SGL Segments chained (PSDT 01b, 5 Data Blocks, 4 per segment) and a Write with FUA:
        # both left to the normal path
        assert host.command(1, IoOpcode.READ, nsid=1, read_len=4096, cdw10=0, cdw12=7, sgl=5).ok
        assert host.command(1, IoOpcode.WRITE, nsid=1, data=data, cdw10=0, cdw12=7 | iocount.FUA).ok

    n, snap = _serve_and_drive([], drive)
    assert n["io.fast"] + n["io.normal"] == 8
    assert n["io.normal"] >= 2 and n["normal.sgl.segment"] == 1 and n["normal.fua"] == 1
    assert n["write.sqdb.io"] == 8  # the host driver rings once per command, no shadow doorbells
    assert n["msg.posted_write"] >= n["write.sqdb.io"] + n.get("write.cqdb.io", 0)
    assert n["irq.eventfd"] >= 1 and n["sys.recvmsg"] >= 1
    per = iocount.per_io(n)
    assert per["write.sqdb.io"] == 1.0
    (ctrl,) = snap["controllers"]
    assert ctrl["cntlid"] == 1 and ctrl["shadow_doorbells"] is False and ctrl["sgl_commands"] >= 1


def test_unsealed_memory_keeps_commands_off_the_fast_path() -> None:
    def drive(host: Any) -> None:
        assert host.write(1, 0, bytes(4096), check=True).ok
        assert host.read(1, 0, 8, check=True).ok

    n, _snap = _serve_and_drive([], drive, sealed=False)  # guarded memory: no direct region
    assert n.get("io.fast", 0) == 0 and n["io.normal"] == 2 and n["normal.other"] == 2


def test_offsets_and_command_fields_are_classified() -> None:
    nvme, table, pba = 0x2000, (0x2000, 0x100), (0x3000, 8)
    assert iocount.bar0_target(0x1000, nvme, table, pba) == "sqdb.admin"
    assert iocount.bar0_target(0x1004, nvme, table, pba) == "cqdb.admin"
    assert iocount.bar0_target(0x1008, nvme, table, pba) == "sqdb.io"
    assert iocount.bar0_target(0x100C, nvme, table, pba) == "cqdb.io"
    assert iocount.bar0_target(0x14, nvme, table, pba) == "bar0.regs"
    assert iocount.bar0_target(0x2010, nvme, table, pba) == "bar0.msix_table"
    assert iocount.bar0_target(0x3000, nvme, table, pba) == "bar0.pba"
    assert iocount.command_why(0x40, 2, 0, 0x00 << 56) == "sgl.data_block"
    assert iocount.command_why(0x40, 2, 0, 0x30 << 56) == "sgl.last_segment"
    assert iocount.command_why(0x01, 2, 0, 0) == "fused"
    assert iocount.command_why(0, 0x08, 0, 0) == "opcode.08"
    assert iocount.command_why(0, 1, iocount.FUA, 0) == "fua"
    assert iocount.command_why(0, 2, 0, 0) == "other"


def test_job_samples_count_new_counters_from_zero_and_the_table() -> None:
    results: dict[str, str] = {}
    values = [{"a": 1.0}, {"a": 3.0, "b": 2.0}]
    s = JobSamples(results, lambda: values[0] if not results else values[1], period=0.005, zero=True)
    s.start()
    results["emu_x_1"] = "1"
    for _ in range(400):
        if s.delta:
            break
        s._stop.wait(0.005)
    s.stop()
    assert s.delta["emu_x_1"] == {"a": 2.0, "b": 2.0}
    table = guest_bench.report_counts({"emu_randread1_iops_1": {
        "io.fast": 4, "io.normal": 0, "msg.posted_write": 4, "msg.RegionReadRequest": 1,
        "write.sqdb.io": 4, "irq.eventfd": 4, "read.config": 1}})
    row = table.splitlines()[1].split()
    assert row[:5] == ["emu_randread1_iops_1", "4", "1.250", "1.000", "0.000"]
    assert "msg.RegionReadRequest 1" in table


def test_bench_with_shadow_doorbells_and_irq_wait_reports_the_cpu_split() -> None:
    import json
    out = subprocess.run([sys.executable, "-m", "emulator", "bench", "--seconds", "0.3", "--size", "8MiB",
                          "--jobs", "4k-read-qd1,4k-write-qd32", "--shadow-doorbells", "--irq-wait", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for j in json.loads(out.stdout)["jobs"]:
        assert j["ios"] > 0 and j["errors"] == 0
        assert j["emu_user_us_per_io"] >= 0 and j["emu_sys_us_per_io"] >= 0 and j["emu_sleeps_per_io"] >= 0


def test_pyspy_top_self_and_total(tmp_path: Path) -> None:
    from emulator.bench import pyspy_top
    raw = tmp_path / "p.txt"
    raw.write_text("main (a.py:1);f (a.py:5);g (b.py:7) 3\n"
                   "main (a.py:1);f (a.py:6) 1\n"
                   "main (a.py:2);g (b.py:9);g (b.py:7) 2\n")
    samples, own, total = pyspy_top.top(raw.read_text().splitlines())
    assert samples == 6
    assert own == {"g (b.py)": 5, "f (a.py)": 1}
    assert total["main (a.py)"] == 6 and total["g (b.py)"] == 5 and total["f (a.py)"] == 4
    assert "83.3 %  g (b.py)" in pyspy_top.report(raw)


def test_attach_runs_a_command_when_an_emulator_job_starts(tmp_path: Path) -> None:
    results: dict[str, str] = {"qemu_randread1_iops_go_1": "1"}
    hooks = benchwatch.Attach(results, "echo {pid} {seconds} > {workdir}/{job}.out", {"pid": 42, "qemu": 7},
                                4, tmp_path).start()
    results["emu_randread1_iops_go_1"] = "1"
    for _ in range(500):
        if (tmp_path / "emu_randread1_iops_1.out").exists():
            break
        hooks._stop.wait(0.01)
    hooks.stop()
    assert (tmp_path / "emu_randread1_iops_1.out").read_text().split() == ["42", "4"]
    assert not list(tmp_path.glob("qemu_*"))


def test_attach_both_runs_the_command_at_the_jobs_on_qemus_disk_too(tmp_path: Path) -> None:
    results: dict[str, str] = {}
    hooks = benchwatch.Attach(results, "echo {device} {qemu} > {workdir}/{job}.out", {"pid": 42, "qemu": 7},
                                4, tmp_path, ("emu", "qemu")).start()
    results["qemu_seqread_kibs_go_1"] = "1"
    results["emu_seqread_kibs_go_1"] = "1"
    results["qemu_seqread_kibs_1"] = "500"  # a result, not a job's start
    for _ in range(500):
        if len(list(tmp_path.glob("*.out"))) == 2:
            break
        hooks._stop.wait(0.01)
    hooks.stop()
    assert (tmp_path / "qemu_seqread_kibs_1.out").read_text().split() == ["qemu", "7"]
    assert (tmp_path / "emu_seqread_kibs_1.out").read_text().split() == ["emu", "7"]
    assert len(list(tmp_path.glob("*.out"))) == 2


def test_hops_cuts_qd1_cycles_from_syscall_events() -> None:
    from emulator.bench import hops
    ev = [
        # (time, pid/tid, comm, event, trace)
        (1.000000, "20/25", "CPU 0/TCG", "sys_enter_sendmsg", "fd: 0x00000009, msg: 0x1, flags: 0x00000000"),
        (1.000050, "10/10", "python3", "sys_exit_epoll_wait", "0x1"),
        (1.000060, "10/10", "python3", "sys_exit_recvmsg", "0x24"),
        (1.000150, "10/10", "python3", "sys_enter_preadv", "fd: 0x00000006, vec: 0x1, vlen: 0x00000001"),
        (1.000200, "10/10", "python3", "sys_enter_write", "fd: 0x0000000f, buf: 0x1, count: 0x00000008"),
        (1.000300, "20/20", "qemu", "sys_enter_read", "fd: 0x00000011, buf: 0x1, count: 0x00000200"),
        (1.000700, "20/25", "CPU 0/TCG", "sys_enter_sendmsg", "fd: 0x00000009, msg: 0x1, flags: 0x00000000"),
        (1.000720, "10/10", "python3", "sys_exit_recvmsg", "0x24"),
        (1.000800, "10/10", "python3", "sys_enter_preadv", "fd: 0x00000006, vec: 0x1, vlen: 0x00000001"),
        (1.000900, "10/10", "python3", "sys_enter_write", "fd: 0x0000000f, buf: 0x1, count: 0x00000008"),
        (1.001000, "20/20", "qemu", "sys_enter_read", "fd: 0x00000011, buf: 0x1, count: 0x00000200"),
        (1.001500, "20/25", "CPU 0/TCG", "sys_enter_sendmsg", "fd: 0x00000009, msg: 0x1, flags: 0x00000000"),
    ]
    text = "\n".join(f"{comm:>16} {pt:>10} [000] {t:.6f}: syscalls:{name}: {trace}" for t, pt, comm, name, trace in ev)
    cyc, found = hops.cycles(hops.parse(text.splitlines()))
    assert found == {"emulator": 10, "qemu": 20, "vcpu_thread": 25, "emulator_irq_fd": 15, "qemu_irq_fd": 17}
    assert len(cyc) == 2
    assert [round(1e6 * (cyc[0][b] - cyc[0][a])) for a, b, _l in hops.HOPS] == [50, 100, 50, 100, 400, 700]
    assert round(1e6 * (cyc[1]["got"] - cyc[1]["send"])) == 20  # already awake: recvmsg
    assert "2 complete QD1 cycles" in hops.report(text)


def test_bench_128k_jobs_with_prp_lists_and_sgls() -> None:
    import json
    for sgl in ("0", "1", "2"):
        out = subprocess.run([sys.executable, "-m", "emulator", "bench", "--seconds", "0.2", "--size", "8MiB",
                              "--jobs", "128k-read-qd4,128k-write-qd4", "--sgl", sgl, "--json"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        jobs = json.loads(out.stdout)["jobs"]
        assert [j["name"] for j in jobs] == ["128k-read-qd4", "128k-write-qd4"]
        assert all(j["ios"] > 0 and j["errors"] == 0 for j in jobs)
