"""What the TCG guest executes per I/O, counted by QEMU itself (``bench --insn``).

A small TCG plugin (``tcgprof.c``, built here with the system's C compiler)
counts the executions of every translated block of the guest, and reports,
when asked over a UNIX socket, those counts, each block's guest address and
instruction count, and the CPU time of QEMU's vCPU threads.  The bench asks
at each guest result marker, so every fio run gets:

- the guest instructions it executed, user and kernel, exactly (no sampling),
  from ``lead`` seconds after fio starts (past its start-up and ramp) to its end;
- the host CPU time the vCPU thread spent on them (``ns/insn``: what one guest
  instruction costs under TCG, MMIO exits into device models included);
- with the guest's ``/proc/kallsyms`` (the bench's guest writes it to a spare
  area of QEMU's disk at the end), the kernel instructions per function, and
  so per area (block layer, NVMe driver, interrupts, ...), and the I/Os
  themselves: calls of ``aio_complete`` (one per libaio I/O).

The plugin's inline counters cost a few host instructions per block: the
figures are for comparing the two devices in one run, not absolute speed.
"""
from __future__ import annotations

import collections
import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from emulator.guest.jobcpu import Ticker

SOURCE = Path(__file__).with_name("tcgprof.c")
KERNEL_BASE = 1 << 63          # x86-64: kernel addresses have the top bit set
KALLSYMS_OFFSET = 128 << 20    # where the guest writes its kallsyms on QEMU's disk
_HEAD = struct.Struct("<4IQ")  # magic, nslots, first_new, reserved, vCPU CPU ns
_MAGIC = 0x50474354

# Areas of a guest I/O, by kernel function name (first match wins).
AREAS: list[tuple[str, re.Pattern[str]]] = [
    ("nvme driver", re.compile(r"^nvme")),
    ("interrupts", re.compile(r"irq|interrupt|apic|msi|softirq|handle_edge|error_entry|common_int")),
    ("block, dma", re.compile(r"^_*(blk|bio|bvec|submit_bio|dma_|sbitmap|blkdev|iov_iter|part_|rq_|bdev)")),
    ("pinning pages", re.compile(r"^_*(gup|try_grab|try_get_folio|folio|mod_node|unpin|lruvec|pin_user)")),
    ("aio, syscalls", re.compile(r"aio|io_submit|io_getevents|ioctx|syscall|sys_|exit_to_user|swapgs|fpregs")),
    ("scheduler, idle, time", re.compile(r"sched|load_avg|psi|enqueue|dequeue|switch|wake|idle|tick|ktime|"
                                         r"clock|update_curr|rcu|timer|pick_")),
]
AREA_ORDER = ["user"] + [a for a, _ in AREAS] + ["other kernel"]


def area(name: str) -> str:
    if name == "[user]":
        return "user"
    for label, rx in AREAS:
        if rx.search(name):
            return label
    return "other kernel"


def build(outdir: Path, cc: str | None = None) -> Path:
    """Compile the plugin into ``outdir`` (named by the source's hash: built once)."""
    src = SOURCE.read_bytes()
    so = Path(outdir) / f"tcgprof-{hashlib.sha256(src).hexdigest()[:12]}.so"
    if so.exists():
        return so
    compiler = cc or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("bench --insn needs a C compiler (cc or gcc) to build its QEMU plugin")
    so.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread",
                    "-o", str(so), str(SOURCE)], check=True)
    return so


def qemu_args(plugin: Path, sock: Path) -> list[str]:
    """QEMU's ``-plugin`` arguments: the plugin answers on ``sock`` (a UNIX socket path:
    at most 107 bytes; a longer one would be cut short by the plugin)."""
    if len(os.fsencode(str(sock))) > 107:
        raise ValueError(f"tcgprof socket path too long for a UNIX socket: {sock}")
    return ["-plugin", f"{plugin},sock={sock}"]


@dataclass
class Blocks:
    """The translated blocks seen so far: guest address and instruction count per slot."""
    vaddr: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.uint64))
    ninsn: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.uint32))


class Client:
    """The bench's end of the plugin's socket."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.blocks = Blocks()

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("tcgprof plugin closed its socket")
            buf += chunk
        return bytes(buf)

    def snapshot(self) -> tuple[int, np.ndarray]:
        """(vCPU CPU ns so far, executions per slot so far); new slots go into ``blocks``."""
        self.sock.sendall(b"s")
        magic, n, first, _r, cpu_ns = _HEAD.unpack(self._read(_HEAD.size))
        if magic != _MAGIC:
            raise ConnectionError(f"tcgprof: bad snapshot header {magic:#x}")
        new = n - first
        vaddr = np.frombuffer(self._read(8 * new), dtype="<u8")
        ninsn = np.frombuffer(self._read(4 * new), dtype="<u4")
        counts = np.frombuffer(self._read(8 * n), dtype="<u8").copy()
        b = self.blocks
        if len(b.vaddr) < n:  # the plugin sends each slot once, in order
            b.vaddr = np.concatenate([b.vaddr[:first], vaddr]).astype(np.uint64)
            b.ninsn = np.concatenate([b.ninsn[:first], ninsn]).astype(np.uint32)
        return cpu_ns, counts

    def close(self) -> None:
        self.sock.close()


class Sampler(Ticker):
    """Per guest result: the executions of each block since the previous result
    (``delta[key]``: slot indices and counts), the vCPU CPU ns and the wall seconds.

    With ``lead`` (seconds), a result whose key has a ``_go`` part (the bench's
    ``device_job_go_ROUND``, printed as fio starts) opens a lead time: the counts
    restart ``lead`` s later, so the next result's figures leave out fio's start-up and
    ramp (a fixed cost per run that would otherwise be spread over its I/Os)."""

    def __init__(self, results: Mapping[str, str], client: Client, period: float = 0.02,
                 lead: float | None = None) -> None:
        super().__init__(period, "tcgprof")
        self.results, self.client, self.lead = results, client, lead
        self.delta: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.cpu_ns: dict[str, int] = {}
        self.wall: dict[str, float] = {}
        self._due: float | None = None
        self.gone = False

    def begin(self) -> None:
        self._seen = set(self.results)
        self._cpu, self._counts = self.client.snapshot()
        self._t = time.monotonic()

    def tick(self) -> None:
        if self.gone:
            return
        try:
            self._tick()
        except OSError:  # QEMU has gone (the guest's end): nothing more to count
            self.gone = True

    def _tick(self) -> None:
        new = [k for k in list(self.results) if k not in self._seen]
        if not new:
            if self._due is not None and time.monotonic() >= self._due:  # the lead is over
                self._due = None
                self._cpu, self._counts = self.client.snapshot()
                self._t = time.monotonic()
            return
        cpu, counts = self.client.snapshot()
        t = time.monotonic()
        d = counts.copy()
        d[:len(self._counts)] -= self._counts
        idx = np.nonzero(d)[0]
        for i, k in enumerate(new):  # several at once: the first takes the interval
            self._seen.add(k)
            self.delta[k] = (idx, d[idx]) if i == 0 else (idx[:0], d[:0])
            self.cpu_ns[k] = cpu - self._cpu if i == 0 else 0
            self.wall[k] = t - self._t if i == 0 else 0.0
        self._due = t + self.lead if self.lead is not None and "_go" in new[-1] else None
        self._cpu, self._counts, self._t = cpu, counts, t


class Symbols:
    """Kernel text symbols (from ``/proc/kallsyms`` of the same boot)."""

    def __init__(self, kallsyms: str) -> None:
        pairs = []
        for line in kallsyms.splitlines():
            p = line.split()
            if len(p) >= 3 and p[1] in "tTwW":
                try:
                    pairs.append((int(p[0], 16), p[2]))
                except ValueError:
                    continue
        pairs.sort()
        self.addr = np.array([a for a, _ in pairs], dtype=np.uint64)
        self.names = [n for _, n in pairs]

    def __bool__(self) -> bool:
        return len(self.names) > 0

    def name_of(self, vaddr: np.ndarray) -> list[str]:
        i = np.searchsorted(self.addr, vaddr, side="right") - 1
        return ["[user]" if v < KERNEL_BASE else (self.names[j] if j >= 0 else "?")
                for v, j in zip(vaddr.tolist(), i.tolist())]

    def address(self, name: str) -> int | None:
        try:
            return int(self.addr[self.names.index(name)])
        except ValueError:
            return None


def read_kallsyms(image: Path, offset: int = KALLSYMS_OFFSET, limit: int = 32 << 20) -> str:
    """The kallsyms text the guest wrote at ``offset`` of a disk image (up to the first NUL)."""
    try:
        with open(image, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
    except OSError:
        return ""
    return data.split(b"\0", 1)[0].decode(errors="replace")


@dataclass
class JobCost:
    """One device's runs of one job, summed over rounds."""
    insn_user: float = 0.0
    insn_kernel: float = 0.0
    cpu_ns: float = 0.0
    ios: float = 0.0
    by_name: collections.Counter[str] = field(default_factory=collections.Counter)


def fold(s: Sampler, syms: Symbols, rates: Mapping[str, float]) -> dict[str, JobCost]:
    """Per ``device_job`` (results ``device_job_ROUND``): instructions by user/kernel and by
    kernel function, the vCPU's CPU time and the I/Os: calls of ``aio_complete`` when the
    symbols are known, else ``rates[device_job_ROUND]`` (I/Os per second, from fio's
    figure) times the interval's wall time."""
    blocks = s.client.blocks
    names = syms.name_of(blocks.vaddr) if syms else None
    aio = syms.address("aio_complete") if syms else None
    aio_slots = np.nonzero(blocks.vaddr == np.uint64(aio))[0] if aio is not None else np.array([], dtype=int)
    out: dict[str, JobCost] = {}
    for k, (idx, cnt) in s.delta.items():
        head, _, rnd = k.rpartition("_")
        if not rnd.isdigit() or not head.endswith(("_iops", "_kibs")):
            continue
        c = out.setdefault(head, JobCost())
        insn = cnt.astype(np.float64) * blocks.ninsn[idx]
        kern = blocks.vaddr[idx] >= np.uint64(KERNEL_BASE)
        c.insn_kernel += float(insn[kern].sum())
        c.insn_user += float(insn[~kern].sum())
        c.cpu_ns += s.cpu_ns.get(k, 0)
        calls = float(cnt[np.isin(idx, aio_slots)].sum()) if len(aio_slots) else 0.0
        c.ios += calls if calls else rates.get(k, 0.0) * s.wall.get(k, 0.0)
        if names is not None:
            for j, n in zip(idx.tolist(), insn.tolist()):
                c.by_name[names[j]] += n
    return out


def report(costs: Mapping[str, JobCost], top: int = 12) -> str:
    """Per job, both devices: guest instructions per I/O (user, kernel, by area), vCPU ns
    per instruction, and the kernel functions whose instructions per I/O differ most."""
    lines = ["guest instructions per I/O (QEMU's TCG plugin; exact counts) and vCPU ns per instruction"]
    jobs = sorted({k.split("_", 1)[1] for k in costs})
    for job in jobs:
        q, e = costs.get(f"qemu_{job}"), costs.get(f"emu_{job}")
        if q is None or e is None or not q.ios or not e.ios:
            continue
        lines.append(f"{job}: {'QEMU nvme':>12} {'nvme-emu':>10}")
        tq, te = (q.insn_user + q.insn_kernel) / q.ios, (e.insn_user + e.insn_kernel) / e.ios
        lines.append(f"  {'I/Os counted':28} {q.ios:12.0f} {e.ios:10.0f}")
        lines.append(f"  {'instructions per I/O':28} {tq:12.0f} {te:10.0f}")
        lines.append(f"  {'  user':28} {q.insn_user / q.ios:12.0f} {e.insn_user / e.ios:10.0f}")
        lines.append(f"  {'  kernel':28} {q.insn_kernel / q.ios:12.0f} {e.insn_kernel / e.ios:10.0f}")
        if q.by_name and e.by_name:
            aq, ae = collections.Counter(), collections.Counter()
            for n, v in q.by_name.items():
                aq[area(n)] += v
            for n, v in e.by_name.items():
                ae[area(n)] += v
            for a in AREA_ORDER[1:]:
                lines.append(f"  {'    ' + a:28} {aq[a] / q.ios:12.0f} {ae[a] / e.ios:10.0f}")
        nq = q.cpu_ns / max(q.insn_user + q.insn_kernel, 1)
        ne = e.cpu_ns / max(e.insn_user + e.insn_kernel, 1)
        lines.append(f"  {'vCPU ns per instruction':28} {nq:12.2f} {ne:10.2f}")
        lines.append(f"  {'vCPU µs per I/O':28} {q.cpu_ns / q.ios / 1e3:12.1f} {e.cpu_ns / e.ios / 1e3:10.1f}")
        if q.by_name and e.by_name and top:
            diff = {n: e.by_name[n] / e.ios - q.by_name[n] / q.ios for n in set(q.by_name) | set(e.by_name)
                    if n != "[user]"}
            worst = sorted(diff, key=lambda n: -abs(diff[n]))[:top]
            lines.append("  kernel functions, instructions per I/O (most different first):")
            for n in worst:
                lines.append(f"    {n[:40]:40} {q.by_name[n] / q.ios:9.0f} {e.by_name[n] / e.ios:9.0f}"
                             f" {diff[n]:+8.0f}")
    return "\n".join(lines)
