"""Host-side watchers of a running guest benchmark (emulator/guest/bench.py): where
QEMU's vCPU thread and the emulator's loop thread run (``Placement``), pinning them
(``pin``, ``--pin``), and tools started at each job (``Attach``, ``--attach``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from emulator.guest.jobcpu import Ticker, cpu_seconds


def threads(pid: int) -> dict[int, float]:
    """Thread id -> CPU seconds so far, of process ``pid``'s threads."""
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        v = cpu_seconds(pid, int(t.name))
        if v is not None:
            out[int(t.name)] = v
    return out


def busiest_thread(pid: int) -> int:
    """The thread of ``pid`` with the most CPU time: once the guest has booted, QEMU's
    TCG vCPU thread (-smp 1)."""
    busy = threads(pid)
    return max(busy, key=lambda t: busy[t])


PIN_LAYOUTS = ("vcpu", "split")


def pin(layout: str, qemu: int | None, emu: int | None) -> None:
    """Pin QEMU's and the emulator's threads (threads created later inherit it): ``vcpu``:
    QEMU's vCPU thread on the first allowed CPU, every other thread on the rest;
    ``split``: QEMU on the first, the emulator on the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    if qemu is None or len(cpus) < 2:
        print(f"bench: --pin needs QEMU running and 2 CPUs (allowed: {cpus}); not pinned",
              file=sys.stderr)
        return
    vcpu = busiest_thread(qemu)
    for pid in (qemu, emu):
        if pid is None:
            continue
        for tid in threads(pid):
            first = tid == vcpu if layout == "vcpu" else pid == qemu
            try:
                os.sched_setaffinity(tid, cpus[:1] if first else cpus[1:])
            except OSError:
                pass  # a thread that just ended


class Placement(Ticker):
    """Where QEMU's vCPU thread and the emulator's loop thread run: every ``period`` s the
    CPU each last ran on (/proc/PID/task/TID/stat, field 39); ``sample`` returns the
    samples so far, how many found both on the same CPU, and the vCPU thread's time on a
    CPU and time runnable but waiting for one (schedstat, ns), for JobSamples."""

    def __init__(self, qemu: int, emu: int, period: float = 0.005) -> None:
        super().__init__(period, "bench-placement")
        vcpu = f"/proc/{qemu}/task/{busiest_thread(qemu)}"
        self.paths = (f"{vcpu}/stat", f"/proc/{emu}/task/{emu}/stat")
        self.schedstat = f"{vcpu}/schedstat"
        self.counts = {"place.samples": 0.0, "place.shared": 0.0, "place.vcpu_run_ns": 0.0,
                       "place.vcpu_wait_ns": 0.0}

    def sample(self) -> dict[str, float]:
        try:  # schedstat: time on a CPU, time runnable but waiting, ns
            run, wait = open(self.schedstat).read().split()[:2]
            self.counts["place.vcpu_run_ns"] = float(run)
            self.counts["place.vcpu_wait_ns"] = float(wait)
        except (OSError, IndexError, ValueError):
            pass
        return dict(self.counts)

    def tick(self) -> None:
        try:
            cpus = [open(p, "rb").read().rsplit(b")", 1)[1].split()[36] for p in self.paths]
        except (OSError, IndexError):
            return
        self.counts["place.samples"] += 1
        self.counts["place.shared"] += cpus[0] == cpus[1]


class Attach(Ticker):
    """Starts ``command`` (formatted) whenever the guest says a job on one of ``devices``
    starts (``emu``: nvme-emu's disk, ``qemu``: QEMU's)."""

    def __init__(self, results: dict[str, str], command: str, pids: dict[str, int | None], seconds: int,
                 workdir: Path, devices: tuple[str, ...] = ("emu",)) -> None:
        super().__init__(0.01, "bench-attach")
        self.results, self.command, self.pids, self.seconds, self.workdir = results, command, pids, seconds, workdir
        self.devices = devices
        self.procs: list[subprocess.Popen[bytes]] = []
        self._seen: set[str] = set()

    def stop(self) -> None:
        super().stop()
        for p in self.procs:
            try:
                p.wait(self.seconds + 30)
            except subprocess.TimeoutExpired:
                p.kill()

    def tick(self) -> None:
        for k in [k for k in list(self.results) if k not in self._seen]:
            self._seen.add(k)
            device = k.partition("_")[0]
            if device in self.devices and "_go_" in k:
                job = k.replace("_go", "")
                cmd = self.command.format(job=job, seconds=self.seconds, workdir=self.workdir, device=device,
                                          **self.pids)
                self.procs.append(subprocess.Popen(cmd, shell=True))
