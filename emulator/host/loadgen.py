"""`nvme-emu bench`: a host-side load generator, no guest.

Starts ``nvme-emu serve`` as a child process (or attaches to a running one with
``--socket``/``--pid``), drives one controller over vfio-user with the Python
host driver's queues, and prints for each job IOPS and the **emulator's CPU
time per I/O** (utime + stime of the serving process, all its threads, from
``/proc/PID/stat``).  Next to the jobs it prints the physical limit measured on
the same machine: a 4 KiB memcpy and a 4 KiB ``preadv`` from the page cache.

The submission loop is lean on purpose: SQEs are packed once per slot, the
SQ tail and CQ head doorbells of a batch go as posted (NO_REPLY) region
writes, and completions are found by the phase tag (NVMe Base 2.1 §4.2.4), so
the generator costs the emulator nothing but the I/O itself.  The emulator's
CPU per I/O is therefore what the hot path costs: doorbell message -> SQE
fetch -> decode -> PRP -> preadv/pwritev -> CQE -> interrupt.  IOPS depend on
the generator too (it shares the machine); CPU per I/O does not.

``--path`` picks the I/O fast path of the serving child (emulator/nvme/fastpath.py):
``c``, ``python`` (the child runs with NVME_EMU_NO_CBIND=1), ``off`` (no fast
path: every command through the normal handlers), ``both`` (c, then python) or
``all``; each path gets its own child, and the table shows them side by side.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from emulator.host.driver import HostQueue, NvmeHost
from emulator.host.memory import PAGE, HostMemory
from emulator.host.transport import BAR0, VfioUserTransport
from emulator.nvme.spec import CQE, CQE_SIZE, DOORBELL_BASE, SQE, SQE_SIZE, IoOpcode

CLK_TCK = os.sysconf("SC_CLK_TCK")

# (name, opcode, queues, queue depth per queue)
DEFAULT_JOBS: list[tuple[str, int, int, int]] = [
    ("4k-read-qd1", IoOpcode.READ, 1, 1),
    ("4k-write-qd1", IoOpcode.WRITE, 1, 1),
    ("4k-read-qd32", IoOpcode.READ, 1, 32),
    ("4k-write-qd32", IoOpcode.WRITE, 1, 32),
    ("4k-read-4q-qd8", IoOpcode.READ, 4, 8),
    ("4k-write-4q-qd8", IoOpcode.WRITE, 4, 8),
]


# More jobs, by name only (--jobs): 128 KiB at QD4, what the guest benchmark's sequential jobs do.
MORE_JOBS: list[tuple[str, int, int, int]] = [
    ("128k-read-qd4", IoOpcode.READ, 1, 4),
    ("128k-write-qd4", IoOpcode.WRITE, 1, 4),
]


def job_bytes(name: str) -> int:
    """The transfer size of a job, from its name ("4k-...", "128k-...")."""
    return int(name.split("k-", 1)[0]) << 10


PATHS = ("c", "python", "off")
# c-ring: the C fast path without the shadow SQ tail poller's turns in C (every
# submission of a --shadow-doorbells host then rings, as before they existed);
# poll: c and c-ring side by side
PATH_SETS = {"c": ["c"], "python": ["python"], "off": ["off"], "both": ["c", "python"],
             "all": ["c", "python", "off"], "c-ring": ["c-ring"], "poll": ["c", "c-ring"]}


@dataclass
class JobResult:
    name: str
    ios: int
    seconds: float
    iops: float
    emu_cpu_us_per_io: float  # emulator process CPU (all threads) per I/O
    gen_cpu_us_per_io: float  # this generator's CPU per I/O, for context
    errors: int
    path: str = ""  # the serving child's fast path (c, python, off), "" when attached
    emu_user_us_per_io: float = 0.0  # the emulator's CPU per I/O, user part
    emu_sys_us_per_io: float = 0.0  # ... system part
    emu_sleeps_per_io: float = 0.0  # voluntary context switches of its threads (they slept)
    emu_preempted_per_io: float = 0.0  # involuntary ones (it was preempted)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (proc(5): fields 14 and 15)."""
    user, system, _v, _n = proc_times(pid)
    return user + system


def proc_times(pid: int) -> tuple[float, float, int, int]:
    """utime and stime of every thread of ``pid`` in seconds (proc(5): /proc/PID/stat
    fields 14 and 15), and the voluntary (it slept) and involuntary (it was preempted)
    context switches of all its threads (/proc/PID/task/*/status)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2:].split()
    vol = nonvol = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"voluntary_ctxt_switches:"):
                        vol += int(line.split(b":")[1])
                    elif line.startswith(b"nonvoluntary_ctxt_switches:"):
                        nonvol += int(line.split(b":")[1])
        except OSError:
            continue  # a thread that ended meanwhile
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK, vol, nonvol


# ---------------------------------------------------------------------- physical limits
def memcpy_4k_us(n: int = 200_000) -> tuple[float, float]:
    """(per call, net of a 1-byte call) µs for a 4 KiB memmove through ctypes."""
    a = ctypes.create_string_buffer(PAGE)
    b = ctypes.create_string_buffer(PAGE)
    mv = ctypes.memmove

    def loop(size: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            mv(a, b, size)
        return (time.perf_counter() - t) / n * 1e6

    full, tiny = min(loop(PAGE) for _ in range(3)), min(loop(1) for _ in range(3))
    return full, max(0.0, full - tiny)


def preadv_4k_us(path: Path, n: int = 100_000) -> tuple[float, float]:
    """(per call, net of a 1-byte preadv) µs for a 4 KiB preadv from page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(PAGE)
        one = bytearray(1)
        size = max(PAGE, os.fstat(fd).st_size)
        span = min(size, 16 << 20) // PAGE
        for i in range(span):  # warm the page cache
            os.preadv(fd, [buf], i * PAGE)

        def loop(b: bytearray) -> float:
            t = time.perf_counter()
            for i in range(n):
                os.preadv(fd, [b], (i % span) * PAGE)
            return (time.perf_counter() - t) / n * 1e6

        full, tiny = min(loop(buf) for _ in range(3)), min(loop(one) for _ in range(3))
        return full, max(0.0, full - tiny)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- the driving loop
def run_job(host: NvmeHost, pid: int, name: str, opc: int, queues: list[int], depth: int,
            seconds: float, nsid: int, lba_size: int, ns_lbas: int, bs: int = PAGE,
            seed: int = 1, cq_doorbell_every: int = 1, batch: int = 1,
            irq_wait: bool = False, sgl: int = 0, think_us: float = 0.0) -> JobResult:
    """Keep ``depth`` commands outstanding on each queue for ``seconds``.

    The CQ head doorbell is rung once per ``cq_doorbell_every`` batches of
    completions (and always while draining); the queues are at least twice
    ``depth`` deep, so the controller never finds its CQ full in between.
    ``batch`` > 1: a queue's finished commands are resubmitted (one SQ doorbell)
    only once at least that many have completed, so each doorbell carries a
    batch of commands whatever the relative speed of generator and emulator.
    With shadow doorbells on the host (``NvmeHost.enable_shadow_doorbells``) the
    doorbells go through the shadow buffer and MMIO only when EventIdx asks, as
    Linux does.  ``irq_wait``: when a pass finds no completion, sleep on the
    queues' interrupt eventfds (as QEMU's main loop does for a guest) instead of
    polling the CQs.  ``sgl`` describes each buffer with an SGL (PSDT 01b, Base 2.1
    §4.1.2): 1 a Data Block descriptor in DPTR, N > 1 a Last Segment descriptor
    pointing to a list of N Data Blocks (what Linux sends for 128 KiB); 0 PRPs (with
    a PRP list past two pages).  ``think_us``: a queue resubmits only that long (a busy
    wait) after it found its completions, as a guest whose kernel and application take
    their time between a completion and the next command."""
    t = host.t
    assert isinstance(t, VfioUserTransport)
    client = t.client
    mem = host.mem
    view = mem.view
    base = mem.iova
    rng = random.Random(seed)
    nlb = bs // lba_size
    blocks = ns_lbas // nlb
    state: list[tuple[HostQueue, list[int], list[int]]] = []
    for qid in queues:
        q = host.queues[qid]
        if depth >= q.size:
            raise ValueError(f"depth {depth} needs a queue larger than {q.size}")
        bufs = [mem.alloc(bs) for _ in range(depth)]
        state.append((q, bufs, []))
    lists: list[int] = []  # PRP or SGL list pages, freed at the end
    dptr: dict[int, tuple[int, int, int]] = {}  # buffer -> (flags, DPTR low, DPTR high)

    def describe(buf: int) -> tuple[int, int, int]:
        if sgl == 1:  # one Data Block descriptor: address, length, identifier 00h (Figure 120)
            return 1 << 6, buf, bs
        if sgl > 1:  # Last Segment (identifier 30h) -> a list of Data Blocks
            lp = mem.alloc(PAGE)
            lists.append(lp)
            piece = bs // sgl
            for i in range(sgl):
                n = piece if i < sgl - 1 else bs - piece * (sgl - 1)
                struct.pack_into("<QI3xB", view, lp - base + 16 * i, buf + piece * i, n, 0x00)
            return 1 << 6, lp, (16 * sgl) | (0x30 << 56)
        if bs <= PAGE:
            return 0, buf, 0
        if bs <= 2 * PAGE:
            return 0, buf, buf + PAGE
        lp = mem.alloc(PAGE)  # PRP list (Base 2.1 §4.1.1): the pages after the first
        lists.append(lp)
        for i in range(1, (bs + PAGE - 1) // PAGE):
            struct.pack_into("<Q", view, lp - base + 8 * (i - 1), buf + PAGE * i)
        return 0, buf, lp

    for _q, bufs, _f in state:
        for b in bufs:
            dptr[b] = describe(b)
    pack = SQE.pack_into
    unpack = CQE.unpack_from
    ios = errors = 0
    shadow = host.shadow is not None
    efds = [t.eventfds[q.vector] for q, _b, _f in state if q.vector < len(t.eventfds)] if irq_wait else []

    def ring(q: HostQueue, cq: bool, value: int) -> None:
        if shadow:
            host._doorbell(2 * q.qid + cq, value)  # shadow store, MMIO only when EventIdx asks
        else:
            client.region_write(BAR0, DOORBELL_BASE + (2 * q.qid + cq) * 4, value.to_bytes(4, "little"),
                                posted=True)

    def submit(q: HostQueue, bufs: list[int], cid: int) -> None:
        slba = rng.randrange(blocks) * nlb
        off = q.sq_iova - base + q.sq_tail * SQE_SIZE
        flags, dp1, dp2 = dptr[bufs[cid]]
        pack(view, off, opc, flags, cid, nsid, 0, 0, 0, dp1, dp2,
             slba & 0xFFFFFFFF, slba >> 32, nlb - 1, 0, 0, 0)
        q.sq_tail = (q.sq_tail + 1) % q.size

    batch = max(1, min(batch, depth))
    for q, bufs, _free in state:
        for cid in range(depth):
            submit(q, bufs, cid)
        ring(q, False, q.sq_tail)
    times0, gen0, t0 = proc_times(pid), time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    draining = False
    outstanding = depth * len(state)
    batches = 0
    while outstanding:
        now = time.perf_counter()
        if not draining and now >= deadline:
            draining = True
        found = 0
        for q, bufs, free in state:
            got = 0
            while True:
                off = q.cq_iova - base + q.cq_head * CQE_SIZE
                # The phase tag first, the rest after it (a real driver's read barrier):
                # a CQE read in one go can be half old, half new while it is written.
                if (view[off + 14] & 1) != q.phase:
                    break
                _dw0, _dw1, _sqhd, _sqid, cid, sf = unpack(view, off)
                got += 1
                if cid >= depth:  # not one of ours: count it, never resubmit it
                    errors += 1
                    q.cq_head += 1
                    if q.cq_head == q.cq_size:
                        q.cq_head, q.phase = 0, q.phase ^ 1
                    outstanding -= 1
                    continue
                if sf >> 1:
                    errors += 1
                q.cq_head += 1
                if q.cq_head == q.cq_size:
                    q.cq_head, q.phase = 0, q.phase ^ 1
                if draining:
                    outstanding -= 1
                else:
                    free.append(cid)
            if got:
                ios += got
                found += got
                batches += 1
                if draining or batches % cq_doorbell_every == 0:
                    ring(q, True, q.cq_head)
            if draining and free:
                outstanding -= len(free)  # finished, never resubmitted
                free.clear()
            elif len(free) >= batch:
                if think_us:
                    until = time.perf_counter() + think_us / 1e6
                    while time.perf_counter() < until:
                        pass
                for cid in free:
                    submit(q, bufs, cid)
                free.clear()
                ring(q, False, q.sq_tail)
        if efds and not found and outstanding:
            ready, _w, _x = select.select(efds, [], [], 1.0)
            for fd in ready:
                try:
                    os.read(fd, 8)
                except BlockingIOError:
                    pass
    elapsed = time.perf_counter() - t0
    times = [b - a for a, b in zip(times0, proc_times(pid))]
    cpu = times[0] + times[1]
    gen = time.process_time() - gen0
    for _q, bufs, _free in state:
        for b in bufs:
            mem.free(b, bs)
    for lp in lists:
        mem.free(lp, PAGE)
    n = max(ios, 1)
    return JobResult(name, ios, elapsed, ios / elapsed, cpu / n * 1e6, gen / n * 1e6, errors,
                     emu_user_us_per_io=times[0] / n * 1e6, emu_sys_us_per_io=times[1] / n * 1e6,
                     emu_sleeps_per_io=times[2] / n, emu_preempted_per_io=times[3] / n)


# ---------------------------------------------------------------------- the serving child
def child_env(path: str) -> dict[str, str]:
    """The environment of a serving child that uses fast path ``path``."""
    env = dict(os.environ)
    env.pop("NVME_EMU_NO_CBIND", None)
    env.pop("NVME_EMU_FASTPATH", None)
    env.pop("NVME_EMU_SQ_WAIT", None)
    if path == "python":
        env["NVME_EMU_NO_CBIND"] = "1"
    elif path == "off":
        env["NVME_EMU_FASTPATH"] = "off"
    elif path == "c-ring":
        env["NVME_EMU_SQ_WAIT"] = "off"  # emulator/nvme/sqwait.py
    return env


def start_server(state_dir: Path, size: str, lba_size: int,
                 path: str = "c") -> tuple[subprocess.Popen[str], str]:
    import yaml
    cfg = {"state_dir": str(state_dir),
           "namespaces": [{"nsid": 1, "file": "bench.img", "size": size, "lba_size": lba_size}],
           "controllers": [{"cntlid": 1, "socket": "bench.sock"}]}
    (state_dir / "bench.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.Popen([sys.executable, "-m", "emulator", "serve", str(state_dir / "bench.yaml"),
                          "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True,
                         env=child_env(path))
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if not line.startswith("listening on "):
        p.kill()
        raise RuntimeError(f"nvme-emu serve did not start: {line!r}")
    return p, line[len("listening on "):]


def connect(sock: str, queues: int, qsize: int, sealed: bool = True) -> NvmeHost:
    """A host on ``sock``; ``sealed`` memory is what QEMU gives (the emulator's direct
    copy path), unsealed memory takes the guarded copies (emulator/memory/safecopy.py)."""
    from emulator.vfio_user.client import VfioUserClient
    client = VfioUserClient(sock)
    memory = HostMemory(64 << 20, sealed=sealed)
    host = NvmeHost(VfioUserTransport(client, memory, vectors=queues + 1))
    host.init(io_queues=queues, qsize=qsize)
    return host


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=3.0, help="run time per job")
    p.add_argument("--size", default="256MiB", help="namespace size of the child server")
    p.add_argument("--lba-size", type=int, default=512, choices=(512, 4096))
    p.add_argument("--socket", help="attach to a running server's socket instead of starting one")
    p.add_argument("--pid", type=int, help="with --socket: the serving process (for its CPU time)")
    p.add_argument("--jobs", help="comma-separated job names (default: the 4 KiB ones; also "
                                  "128k-read-qd4, 128k-write-qd4)")
    p.add_argument("--fill", action="store_true",
                   help="write the whole namespace first, so reads hit allocated blocks")
    p.add_argument("--cq-doorbell-every", type=int, default=1, metavar="N",
                   help="ring the CQ head doorbell once per N completion batches (QD1 only: "
                        "what the CQ doorbell message costs)")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="resubmit a queue's finished commands only once N have completed "
                        "(one SQ doorbell per N commands; capped at the queue depth)")
    p.add_argument("--shadow-doorbells", action="store_true",
                   help="configure shadow doorbells (Doorbell Buffer Config) and ring as Linux does: "
                        "MMIO only when EventIdx asks (the guest's doorbell traffic)")
    p.add_argument("--irq-wait", action="store_true",
                   help="sleep on the interrupt eventfds when no completion is there, instead of "
                        "polling the CQs (the emulator then wakes its peer for every completion, "
                        "as with QEMU)")
    p.add_argument("--think-us", type=float, default=0.0, metavar="US",
                   help="resubmit only this long after the completions were found (a busy wait): "
                        "a guest's turnaround between a completion and its next command")
    p.add_argument("--sgl", type=int, default=0, metavar="N",
                   help="describe the data with SGLs: 1 one Data Block descriptor, N > 1 a Last Segment "
                        "list of N Data Blocks (0: PRPs)")
    p.add_argument("--unsealed", action="store_true",
                   help="host memory not sealed against shrinking (the guarded copy path)")
    p.add_argument("--path", choices=sorted(PATH_SETS), default="c",
                   help="the child's I/O fast path: c (python if C does not build), python, off "
                        "(normal path only), both (c and python side by side), all; c-ring: c "
                        "without the poll turns in C (with --shadow-doorbells every submission "
                        "rings), poll: c and c-ring side by side")
    p.add_argument("--inproc", action="store_true",
                   help="also the fast path alone: Controller.run_sq on a full SQ in this process, "
                        "no messages (emulator/host/fastbench.py), per path")
    p.add_argument("--inproc-128k", action="store_true",
                   help="with --inproc: also 128 KiB commands with PRPs, with an SGL Data Block and "
                        "with an SGL Last Segment of two Data Blocks (64 queued, best of 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _format(results: list[JobResult], limits: dict[str, float]) -> str:
    paths = list(dict.fromkeys(r.path for r in results))
    head = f"{'job':<18}"
    for p in paths:
        label = f" [{p}]" if p else ""
        head += (f"{'IOPS' + label:>16} {'emu µs/IO' + label:>19}{'usr/sys':>10}{'sleep/pre':>10}"
                 f"{'gen µs/IO':>10}{'err':>5}")
    lines = [head]
    by = {(r.path, r.name): r for r in results}
    for name in dict.fromkeys(r.name for r in results):
        line = f"{name:<18}"
        for p in paths:
            r = by[(p, name)]
            split = f"{r.emu_user_us_per_io:.0f}/{r.emu_sys_us_per_io:.0f}"
            switches = f"{r.emu_sleeps_per_io:.2f}/{r.emu_preempted_per_io:.2f}"
            line += (f"{r.iops:>16.0f} {r.emu_cpu_us_per_io:>19.1f}{split:>10}{switches:>10}"
                     f"{r.gen_cpu_us_per_io:>10.1f}{r.errors:>5}")
        lines.append(line)
    lines.append("physical limit on this machine (µs per call; net of a 1-byte call):")
    lines.append(f"  4 KiB memcpy          {limits['memcpy_us']:.2f}  ({limits['memcpy_net_us']:.2f})")
    lines.append(f"  4 KiB preadv (cache)  {limits['preadv_us']:.2f}  ({limits['preadv_net_us']:.2f})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    jobs = DEFAULT_JOBS
    if args.jobs:
        wanted = set(args.jobs.split(","))
        jobs = [j for j in DEFAULT_JOBS + MORE_JOBS if j[0] in wanted]
        if not jobs:
            print(f"nvme-emu bench: no job among {sorted(wanted)}", file=sys.stderr)
            return 2
    if args.socket and not args.pid:
        print("nvme-emu bench: --socket needs --pid", file=sys.stderr)
        return 2
    results: list[JobResult] = []
    dirs: list[Path] = []
    try:
        for path in ([""] if args.socket else _available(PATH_SETS[args.path])):
            dirs.append(Path(tempfile.mkdtemp(prefix="ne-bench-")))
            results += _run_path(args, jobs, path, dirs[-1])
        img = dirs[-1] / "bench.img"  # the preadv limit reads from the namespace's file system
        m_full, m_net = memcpy_4k_us()
        p_full, p_net = preadv_4k_us(img if img.exists() else Path(sys.executable))
        limits = {"memcpy_us": m_full, "memcpy_net_us": m_net, "preadv_us": p_full,
                  "preadv_net_us": p_net}
        doc: dict[str, Any] = {"jobs": [asdict(r) for r in results], "limits": limits}
        if args.inproc:
            from emulator.host.fastbench import run_sq_us_per_command
            inproc_paths = _available(PATH_SETS["all"])
            doc["run_sq_us"] = run_sq_us_per_command(inproc_paths, fill=args.fill)
            doc["run_sq_us_qd1"] = run_sq_us_per_command(inproc_paths, per_call=1, fill=args.fill)
            if args.inproc_128k:
                doc["run_sq_us_128k"] = {
                    shape: run_sq_us_per_command(inproc_paths, count=64, rounds=10, fill=args.fill,
                                                 shape=shape)
                    for shape in ("128k-prp", "128k-sgl", "128k-sgl2")}
        if args.json:
            print(json.dumps(doc, indent=1))
        else:
            print(_format(results, limits))
            if args.inproc:
                print("the fast path alone: Controller.run_sq on 256 queued 4 KiB commands, "
                      "no messages (thread CPU µs per command, best of 20"
                      + (", namespace filled first" if args.fill else "") + "):")
                for path, r in doc["run_sq_us"].items():
                    print(f"  {path:<8} read {r['read']:6.2f}   write {r['write']:6.2f}")
                print("the same, one command per run_sq call (the QD1 shape):")
                for path, r in doc["run_sq_us_qd1"].items():
                    print(f"  {path:<8} read {r['read']:6.2f}   write {r['write']:6.2f}")
                for shape, by_path in doc.get("run_sq_us_128k", {}).items():
                    print(f"64 queued 128 KiB commands, {shape} (best of 10):")
                    for path, r in by_path.items():
                        print(f"  {path:<8} read {r['read']:6.2f}   write {r['write']:6.2f}")
        return 1 if any(r.errors for r in results) else 0
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def _available(paths: list[str]) -> list[str]:
    """``paths`` with "c" as "python" when the C module does not build here (the child
    would fall back the same way), without duplicates."""
    from cbind import build, ioq
    if "c" in paths and ioq.LIB is None:
        print(f"nvme-emu bench: C fast path not built ({build.why.get('ioq')}); python instead",
              file=sys.stderr)
        paths = ["python" if p in ("c", "c-ring") else p for p in paths]
    return list(dict.fromkeys(paths))


def _run_path(args: argparse.Namespace, jobs: list[tuple[str, int, int, int]], path: str,
              state_dir: Path) -> list[JobResult]:
    """The jobs against one serving process: a child with fast path ``path``, or the one
    given by --socket/--pid (``path`` "")."""
    queues = max(j[2] for j in jobs)
    depth = max(j[3] for j in jobs)
    child = None
    try:
        if args.socket:
            sock, pid = args.socket, args.pid
        else:
            child, sock = start_server(state_dir, args.size, args.lba_size, path)
            pid = child.pid
        host = connect(sock, queues, qsize=max(64, 2 * depth), sealed=not args.unsealed)
        idns = host.identify(cns=0, nsid=1)
        ns_lbas = int.from_bytes(idns[0:8], "little")
        if args.fill:
            _fill(host, ns_lbas, args.lba_size)
        if args.shadow_doorbells and not host.enable_shadow_doorbells().ok:
            raise RuntimeError("Doorbell Buffer Config failed")
        results = [run_job(host, pid, name, opc, list(range(1, nq + 1)), qd, args.seconds,
                           1, args.lba_size, ns_lbas,
                           cq_doorbell_every=args.cq_doorbell_every if qd == 1 else 1,
                           batch=args.batch, irq_wait=args.irq_wait, bs=job_bytes(name), sgl=args.sgl,
                           think_us=args.think_us)
                   for name, opc, nq, qd in jobs]
        host.close()
        for r in results:
            r.path = path
        return results
    finally:
        if child is not None:
            child.terminate()
            child.wait(30)


def _fill(host: NvmeHost, ns_lbas: int, lba_size: int) -> None:
    chunk = 128 << 10
    data = b"\xa5" * chunk
    nlb = chunk // lba_size
    for slba in range(0, ns_lbas - nlb + 1, nlb):
        host.write(1, slba, data, lba_size=lba_size, check=True)
