"""Benchmark: the emulator's CPU per I/O around the fast path, without a scheduler in the way.

    python -m emulator.bench.iopath [--batch N] [--ios 20000] [--repeat 5] [--path c|python|off]

A subsystem runs in this process (a RuntimeThread); a host driver sets up one
I/O queue pair over vfio-user with sealed memory.  Then, on the event-loop
thread itself (so that the loop never waits in ``epoll_wait``), each round
does what ``nvme-emu bench`` does at QD1 (``--batch N``: N commands per SQ
doorbell): the host writes the SQE(s) of 4 KiB reads at random LBAs of a
written area and sends its posted CQ head doorbell (for the previous round)
and SQ tail doorbell on the socket; then the server's reader callback
(``VfioUserServer._on_readable``) runs as the loop would run it, the whole
path: ``recvmsg`` until EAGAIN, codec, session, PCI function, controller
doorbell, arbiter, fast path, CQE, ``flush_interrupts`` and the eventfd
``write`` (and an arbiter continuation, if a preempted pass left one).  Only that call is timed, in wall time (CPU time here: one thread,
no I/O wait): the median round of the best of ``--repeat`` runs, per I/O (a
round that other work on the machine preempted does not move the median).
The host's side (packing SQEs, sending, reading CQEs and the eventfd) is not
counted.

What it leaves out, compared with ``nvme-emu bench``: the wakeup of a sleeping
process (``epoll_wait`` and the scheduler) and the cold caches of a process
woken once per I/O, which on a shared machine cost as much again.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from emulator.host.driver import NvmeHost
from emulator.host.memory import PAGE, HostMemory
from emulator.host.transport import VfioUserTransport
from emulator.nvme import fastpath
from emulator.nvme.spec import CQE, DOORBELL_BASE, SQE, SQE_SIZE, IoOpcode

BAR0 = 0
CQE_SIZE = 16
AREA_LBAS = 8192  # 4 MiB of 512-byte LBAs, written before the reads


def io_path_us(batch: int = 1, ios: int = 20000, repeat: int = 5, path: str | None = None) -> float:
    """The best of ``repeat`` runs: µs per 4 KiB read in the server's reader callback
    (the median round)."""
    from emulator.subsystem.config import parse_config
    from emulator.subsystem.runtime import RuntimeThread
    from emulator.vfio_user.client import VfioUserClient

    state = Path(tempfile.mkdtemp(prefix="ne-iopath-"))
    cfg = parse_config({"state_dir": str(state),
                        "namespaces": [{"nsid": 1, "size": "16MiB", "lba_size": 512}],
                        "controllers": [{"cntlid": 1, "type": "io"}]}, state)
    rt = RuntimeThread(cfg).start()  # type: ignore[arg-type]
    old = fastpath.PATH
    try:
        if path is not None:
            fastpath.set_path(path)
        mem = HostMemory(16 << 20, sealed=True)
        t = VfioUserTransport(VfioUserClient(rt.socket(1)), mem, vectors=2)
        host = NvmeHost(t)
        host.init(io_queues=1, qsize=max(64, 2 * batch + 1))
        for slba in range(0, AREA_LBAS, 256):
            host.write(1, slba, bytes(256 * 512), check=True)
        server = rt.runtime.servers[1]
        return min(rt.call(_rounds, host, server, batch, ios, timeout=600.0) for _ in range(repeat))
    finally:
        fastpath.set_path(old)
        rt.stop()
        shutil.rmtree(state, ignore_errors=True)


def _rounds(host: NvmeHost, server: Any, batch: int, ios: int) -> float:
    """On the loop thread: ``ios`` reads, ``batch`` per SQ doorbell; µs per read in the reader
    (the median round)."""
    t = host.t
    assert isinstance(t, VfioUserTransport)
    client, mem, efd = t.client, host.mem, t.eventfds[1]
    q = host.queues[1]
    view, base = mem.view, mem.iova
    bufs = [mem.alloc(PAGE) for _ in range(batch)]
    rng = random.Random(1)
    send = client.region_write
    on_readable = server._on_readable
    arbiter = server.backend.device.arbiter
    clock = time.perf_counter_ns
    rounds: list[int] = []
    done = 0
    ring_cq = False
    while done < ios:
        for cid in range(batch):
            slba = rng.randrange(AREA_LBAS // 8) * 8
            SQE.pack_into(view, q.sq_iova - base + q.sq_tail * SQE_SIZE, int(IoOpcode.READ), 0, cid, 1, 0, 0, 0,
                          bufs[cid], 0, slba, 0, 7, 0, 0, 0)
            q.sq_tail = (q.sq_tail + 1) % q.size
        if ring_cq:
            send(BAR0, DOORBELL_BASE + 12, q.cq_head.to_bytes(4, "little"), posted=True)
        send(BAR0, DOORBELL_BASE + 8, q.sq_tail.to_bytes(4, "little"), posted=True)
        t0 = clock()
        on_readable()
        while arbiter._scheduled:  # a pass cut by its time budget (preempted): the loop's next turn
            arbiter._continue()
        rounds.append(clock() - t0)
        for _ in range(batch):
            off = q.cq_iova - base + q.cq_head * CQE_SIZE
            if (view[off + 14] & 1) != q.phase:
                raise RuntimeError("a command did not complete in the reader callback")
            if CQE.unpack_from(view, off)[5] >> 1:
                raise RuntimeError("a read failed")
            q.cq_head += 1
            if q.cq_head == q.cq_size:
                q.cq_head, q.phase = 0, q.phase ^ 1
        os.read(efd, 8)  # the interrupt (raises if none came)
        ring_cq = True
        done += batch
    send(BAR0, DOORBELL_BASE + 12, q.cq_head.to_bytes(4, "little"), posted=True)
    on_readable()
    for b in bufs:
        mem.free(b, PAGE)
    rounds.sort()
    return rounds[len(rounds) // 2] / batch / 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1, help="commands per SQ doorbell")
    ap.add_argument("--ios", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--path", choices=fastpath.PATHS, help="the fast path (default: as the environment says)")
    args = ap.parse_args(argv)
    us = io_path_us(args.batch, args.ios, args.repeat, args.path)
    print(f"{us:.2f} µs per 4 KiB read in the server's reader callback ({args.batch} per doorbell)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
