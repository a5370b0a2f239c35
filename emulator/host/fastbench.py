"""What the I/O fast path alone costs: ``Controller.run_sq`` on a full SQ, no messages.

Part of ``nvme-emu bench`` (emulator/host/loadgen.py, ``--inproc``): a subsystem
runs in this process (a RuntimeThread, as the controller tests use), a host
driver sets up its queues over vfio-user with sealed memory, then for each
fast path (emulator/nvme/fastpath.py: ``c``, ``python``, ``off``) the SQ is
filled with ``count`` 4 KiB commands at random LBAs and one ``run_sq`` call on
the event-loop thread serves them all.  The figure is that thread's CPU time
per command: decode, PRP, ``preadv``/``pwritev``, bitmap, CQE, counters,
without the doorbell message, the event loop and the interrupt around them.
``shape`` picks other commands: 128 KiB with PRPs (a PRP list), with an SGL
Data Block descriptor in SGL1, or with a Last Segment of two Data Blocks (the
shapes a Linux guest sends, Base 2.1 §4.3.2).
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

from emulator.host.driver import NvmeHost
from emulator.host.memory import PAGE, HostMemory
from emulator.host.transport import VfioUserTransport
from emulator.nvme import fastpath
from emulator.nvme.spec import SQE_SIZE, IoOpcode, pack_sqe

# shape -> (bytes per command, how its data buffer is described)
SHAPES = {"4k": (PAGE, "prp"), "128k-prp": (128 << 10, "prp"), "128k-sgl": (128 << 10, "sgl1"),
          "128k-sgl2": (128 << 10, "sgl2")}


def run_sq_us_per_command(paths: list[str], count: int = 256, rounds: int = 20,
                          size: str = "64MiB", per_call: int = 0,
                          fill: bool = False, shape: str = "4k") -> dict[str, dict[str, float]]:
    """{path: {"read": µs, "write": µs}}: the best of ``rounds`` full-SQ passes.  With
    ``per_call`` N, each ``run_sq`` call sees only N new commands (the tail moves by N per
    call, as N doorbells would: N=1 is the QD1 shape), else one call serves all ``count``.
    ``fill`` writes the whole namespace first (through the fast path), so that the passes
    find its blocks allocated and in the page cache, as ``nvme-emu bench --fill`` does;
    without it a Read of a hole and a first Write into the sparse file cost the kernel more."""
    from emulator.subsystem.config import parse_config
    from emulator.subsystem.runtime import RuntimeThread
    from emulator.vfio_user.client import VfioUserClient

    state = Path(tempfile.mkdtemp(prefix="ne-fastbench-"))
    cfg = parse_config({"state_dir": str(state),
                        "namespaces": [{"nsid": 1, "size": size, "lba_size": 512}],
                        "controllers": [{"cntlid": 1, "type": "io"}]}, state)
    rt = RuntimeThread(cfg).start()  # type: ignore[arg-type]
    old = fastpath.PATH
    nbytes, kind = SHAPES[shape]
    try:
        mem = HostMemory(count * (PAGE + nbytes + PAGE) + (16 << 20), sealed=True)
        host = NvmeHost(VfioUserTransport(VfioUserClient(rt.socket(1)), mem))
        host.init(io_queues=1, qsize=count + 1)
        ctrl = rt.runtime.subsystem.controllers[1]
        nsze = int.from_bytes(host.identify(cns=0, nsid=1)[0:8], "little")
        bufs = [mem.alloc(PAGE) for _ in range(count)]
        rng = random.Random(1)
        if fill:
            _fill(rt, host, ctrl, bufs, nsze)
        if nbytes != PAGE or kind != "prp":
            bufs = [mem.alloc(nbytes) for _ in range(count)]
        dptrs = [_dptr(host, b, nbytes, kind) for b in bufs]
        out: dict[str, dict[str, float]] = {}
        for path in paths:
            fastpath.set_path(path)
            out[path] = {}
            for name, opc in (("write", IoOpcode.WRITE), ("read", IoOpcode.READ)):
                best = float("inf")
                for _ in range(rounds):
                    best = min(best, _one_pass(rt, host, ctrl, opc, dptrs, nbytes // 512, nsze, rng,
                                               per_call))
                out[path][name] = best
        host.close()
        return out
    finally:
        fastpath.set_path(old)
        rt.stop()
        import shutil
        shutil.rmtree(state, ignore_errors=True)


def _fill(rt: Any, host: NvmeHost, ctrl: Any, bufs: list[int], nsze: int) -> None:
    """Write every 4 KiB of the namespace, a queue's worth per run_sq call."""
    q = host.queues[1]
    for start in range(0, nsze, 8 * len(bufs)):
        slbas = range(start, min(nsze, start + 8 * len(bufs)), 8)
        for i, (b, slba) in enumerate(zip(bufs, slbas)):
            host.mem.write(q.sq_iova + q.sq_tail * SQE_SIZE,
                           pack_sqe(IoOpcode.WRITE, cid=i, nsid=1, prp1=b, cdw10=slba, cdw12=7))
            q.sq_tail = (q.sq_tail + 1) % q.size

        def serve() -> int:
            sq, cq = ctrl.sqs[1], ctrl.cqs[1]
            sq.tail = q.sq_tail
            n = 0
            while sq.head != sq.tail:
                n += ctrl.run_sq(sq, None)[0]
                cq.head = cq.tail
            ctrl.flush_interrupts()
            return n

        n = rt.call(serve)
        for _ in range(n):
            q.cq_head += 1
            if q.cq_head == q.cq_size:
                q.cq_head, q.phase = 0, q.phase ^ 1


def _dptr(host: NvmeHost, buf: int, nbytes: int, kind: str) -> tuple[int, int, int]:
    """(PRP1 or SGL1 address, PRP2 or SGL1 length and identifier, PSDT flags) of one
    command's buffer; the PRP or SGL list it needs is written once and kept."""
    if kind == "prp":
        p1, p2, _pages = host.build_prps(buf, nbytes)
        return p1, p2, 0
    a, dw, _lists = host.build_sgl(buf, nbytes, 1 if kind == "sgl1" else 2)
    return a, dw, 1 << 6  # PSDT 01b


def _one_pass(rt: Any, host: NvmeHost, ctrl: Any, opc: int, dptrs: list[tuple[int, int, int]],
              nlb: int, nsze: int, rng: random.Random, per_call: int = 0) -> float:
    q = host.queues[1]
    for i, (p1, p2, flags) in enumerate(dptrs):
        slba = rng.randrange(nsze // nlb) * nlb
        host.mem.write(q.sq_iova + q.sq_tail * SQE_SIZE,
                       pack_sqe(opc, cid=i, nsid=1, prp1=p1, prp2=p2, cdw10=slba, cdw12=nlb - 1,
                                flags=flags))
        q.sq_tail = (q.sq_tail + 1) % q.size

    def serve() -> tuple[int, float]:
        sq, cq = ctrl.sqs[1], ctrl.cqs[1]
        if per_call:  # the tails N doorbells would write, one run_sq call each
            tails, pos = [], sq.head
            for _ in range(0, len(dptrs), per_call):
                pos = (pos + min(per_call, len(dptrs) - len(tails) * per_call)) % q.size
                tails.append(pos)
        else:
            tails = [q.sq_tail]  # as the doorbell would, without its message
        run_sq = ctrl.run_sq
        n = 0
        t = time.thread_time()
        for tail in tails:
            sq.tail = tail
            n += run_sq(sq, None)[0]
        dt = time.thread_time() - t
        cq.head = cq.tail  # the host consumed them (we never look at the CQEs here)
        ctrl.flush_interrupts()
        return n, dt

    n, dt = rt.call(serve)
    # follow the controller's CQ tail and phase on the host side
    for _ in range(n):
        q.cq_head += 1
        if q.cq_head == q.cq_size:
            q.cq_head, q.phase = 0, q.phase ^ 1
    return dt / max(n, 1) * 1e6
