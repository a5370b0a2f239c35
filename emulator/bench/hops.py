"""Where a QD1 guest I/O spends its time: the hops between QEMU and the emulator.

    python -m emulator.bench.hops record --emu PID --qemu PID --seconds 2 --out FILE
    python -m emulator.bench.hops report FILE

``record`` runs ``perf record`` on the system-call tracepoints of the two
processes (no kernel symbols needed, a few µs per event) and stores the
``perf script`` text; ``report`` cuts it into I/O cycles, each starting at the
vCPU thread's ``sendmsg`` (QEMU sends the SQ tail doorbell as a posted
REGION_WRITE) and prints the median and mean of each hop:

1. doorbell ``sendmsg`` -> the emulator has the message (its ``epoll_wait``
   or ``recvmsg`` returns): waking the emulator;
2. -> the emulator's ``preadv``/``pwritev``: its message, doorbell and command
   path in Python;
3. -> its eventfd ``write`` (the interrupt): the data transfer, the CQE, the
   rest of the doorbell (shadow EventIdx) and the interrupt path;
4. -> QEMU's main loop ``read``s the eventfd: waking QEMU;
5. -> the next doorbell ``sendmsg``: QEMU injects the MSI, the guest completes
   the I/O, fio submits the next one.

Only meaningful at queue depth 1 (one command in flight: each doorbell's
events belong to it).  With ``bench --attach``:

    python -m emulator.guest.bench --jobs randread1_iops --runtime 6 --rounds 1 \\
        --attach 'python -m emulator.bench.hops record --emu {pid} --qemu auto:{workdir} \\
                  --seconds 3 --delay 2 --out {workdir}/{job}.hops'

The tracing costs the traced processes a few µs per system call, so the
cycle is a little longer than without it.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

EVENTS = ["sendmsg", "recvmsg", "epoll_wait", "write", "read", "preadv", "pwritev", "preadv2", "pwritev2"]
HOPS = [("send", "got", "doorbell sendmsg (QEMU vCPU) -> emulator has the message"),
        ("got", "io", "emulator: message -> preadv/pwritev (Python path to the command)"),
        ("io", "irq", "emulator: preadv/pwritev -> eventfd write (transfer, CQE, interrupt)"),
        ("irq", "qemu", "eventfd write -> QEMU main loop reads the eventfd"),
        ("qemu", "next", "QEMU: MSI, guest completion, fio, next submission -> next doorbell"),
        ("send", "next", "whole cycle")]
_LINE = re.compile(r"^\s*(?P<comm>.+?)\s+(?P<pid>\d+)/(?P<tid>\d+)\s+\[\d+\]\s+(?P<t>[\d.]+):\s+"
                   r"syscalls:sys_(?P<dir>enter|exit)_(?P<call>\w+):?(?P<rest>.*)$")
_FD = re.compile(r"fd: (0x[0-9a-f]+)")


@dataclass
class Event:
    t: float
    pid: int
    tid: int
    comm: str
    enter: bool
    call: str
    fd: int | None
    ret: int | None


def parse(lines: list[str]) -> list[Event]:
    """``perf script -F comm,pid,tid,cpu,time,event,trace`` lines of syscalls:* events."""
    out = []
    for line in lines:
        m = _LINE.match(line)
        if not m:
            continue
        rest = m["rest"]
        fd = _FD.search(rest)
        ret = None
        if m["dir"] == "exit":
            try:
                ret = int(rest.strip().split()[-1], 16)
                if ret >= 1 << 63:
                    ret -= 1 << 64
            except (ValueError, IndexError):
                ret = None
        out.append(Event(float(m["t"]), int(m["pid"]), int(m["tid"]), m["comm"], m["dir"] == "enter",
                         m["call"], int(fd.group(1), 16) if fd else None, ret))
    out.sort(key=lambda e: e.t)
    return out


def cycles(events: list[Event], emu: int | None = None) -> tuple[list[dict[str, float]], dict[str, int]]:
    """The QD1 cycles (hop name -> time) and what was recognised (pids, threads, fds)."""
    if emu is None:  # the process that does the preadv/pwritev
        io = Counter(e.pid for e in events if e.call.startswith(("preadv", "pwritev")))
        emu = io.most_common(1)[0][0] if io else -1
    vcpu_c = Counter(e.tid for e in events if e.pid != emu and e.call == "sendmsg" and e.enter)
    vcpu = vcpu_c.most_common(1)[0][0] if vcpu_c else -1
    qemu = next((e.pid for e in events if e.tid == vcpu), -1)
    irq_c = Counter(e.fd for e in events if e.pid == emu and e.call == "write" and e.enter)
    irq_fd = irq_c.most_common(1)[0][0] if irq_c else -1
    qrd = Counter(e.fd for e in events if e.tid == qemu and e.call == "read" and e.enter)
    q_fd = qrd.most_common(1)[0][0] if qrd else -1
    found = {"emulator": emu, "qemu": qemu, "vcpu_thread": vcpu, "emulator_irq_fd": irq_fd, "qemu_irq_fd": q_fd}
    out: list[dict[str, float]] = []
    cur: dict[str, float] | None = None
    for e in events:
        if e.tid == vcpu and e.call == "sendmsg" and e.enter:
            if cur is not None and len(cur) == 5:
                cur["next"] = e.t
                out.append(cur)
            cur = {"send": e.t}
        elif cur is None:
            continue
        elif e.pid == emu and not e.enter and "got" not in cur and (
                (e.call == "epoll_wait" and (e.ret or 0) > 0) or (e.call == "recvmsg" and (e.ret or 0) > 0)):
            cur["got"] = e.t
        elif e.pid == emu and e.enter and e.call.startswith(("preadv", "pwritev")) and "got" in cur \
                and "io" not in cur:
            cur["io"] = e.t
        elif e.pid == emu and e.enter and e.call == "write" and e.fd == irq_fd and "io" in cur \
                and "irq" not in cur:
            cur["irq"] = e.t
        elif e.tid == qemu and e.enter and e.call == "read" and e.fd == q_fd and "irq" in cur \
                and "qemu" not in cur:
            cur["qemu"] = e.t
    return out, found


def report(text: str) -> str:
    cyc, found = cycles(parse(text.splitlines()))
    lines = [f"{len(cyc)} complete QD1 cycles ({', '.join(f'{k} {v}' for k, v in found.items())})"]
    if not cyc:
        return lines[0]
    lines.append(f"  {'hop':72} {'median µs':>10} {'mean µs':>9}")
    for a, b, label in HOPS:
        xs = [1e6 * (c[b] - c[a]) for c in cyc]
        lines.append(f"  {label:72} {statistics.median(xs):10.1f} {statistics.mean(xs):9.1f}")
    return "\n".join(lines)


def _qemu_pid(spec: str) -> int:
    """A pid, or ``auto:TEXT``: the QEMU process whose command line contains TEXT."""
    if not spec.startswith("auto:"):
        return int(spec)
    text = spec[5:]
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in cmd and text in cmd:
                return int(p.name)
    raise SystemExit(f"no QEMU process with {text!r} in its command line")


def record(emu: int, qemu: int, seconds: float, out: Path) -> None:
    raw = out.with_suffix(out.suffix + ".data")
    evs = ",".join(f"syscalls:sys_{d}_{c}" for c in EVENTS for d in ("enter", "exit"))
    subprocess.run(["perf", "record", "-q", "-p", f"{emu},{qemu}", "-e", evs, "-o", str(raw), "--",
                    "sleep", str(seconds)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out, "w") as f:
        subprocess.run(["perf", "script", "-i", str(raw), "-F", "comm,pid,tid,cpu,time,event,trace"],
                       check=True, stdout=f, stderr=subprocess.DEVNULL)
    raw.unlink()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--emu", type=int, required=True)
    r.add_argument("--qemu", required=True, help="pid, or auto:TEXT (a QEMU whose command line has TEXT)")
    r.add_argument("--seconds", type=float, default=2.0)
    r.add_argument("--delay", type=float, default=0.0, help="wait this long first (past fio's ramp)")
    r.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("report")
    s.add_argument("files", nargs="+", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "record":
        time.sleep(args.delay)
        record(args.emu, _qemu_pid(args.qemu), args.seconds, args.out)
        print(report(args.out.read_text()))
        return 0
    for f in args.files:
        print(f"{f}:\n{report(f.read_text())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
