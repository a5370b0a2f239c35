"""Starvation measurement: how long one controller's heavy legal load delays another's 4 KiB read.

    python3 -m emulator.reliability.starve reads [--count 1000] [--runs 3] [--loop-debug]

An ``emulator serve`` child with two controllers (namespace 1, 1 GiB, on
controller 1 with MDTS 4 MiB; namespace 2 on controller 2).  A prober
process reads 4 KiB from controller 2 every 2 ms while controller 1 runs one
load, released by one doorbell:

* ``reads``: COUNT reads of 4 MiB;
* ``flush``: COUNT Flush commands;
* ``dealloc``: COUNT scattered 4 KiB writes, then one Dataset Management
  deallocating the whole namespace;
* ``copy``: COUNT Copy commands, each of 128 ranges of 32 KiB (4 MiB);
* ``format``: COUNT scattered 4 KiB writes, then one Format NVM.

It prints the load's duration and the prober's latencies (median, 99th
percentile, max) with the machine's load average.  ``--loop-debug`` runs the
child's event loop in asyncio debug mode, which logs every callback longer
than 20 ms: the longest is the emulator's own share of the delay (debug mode
slows the loop down a little).  A measurement, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import statistics
import struct
import sys
import time
from typing import Any

from emulator.reliability.target import Target

CONFIG: dict[str, Any] = {
    "namespaces": [{"nsid": 1, "size": "1GiB"}, {"nsid": 2, "size": "64MiB"}],
    "controllers": [{"cntlid": 1, "namespaces": [1], "mdts": 10}, {"cntlid": 2, "namespaces": [2]}],
}
SLOW_CALLBACK = 0.020
_TOOK = re.compile(r"took (\d+\.\d+) seconds")


def _host(sock: str, memory: int = 8 << 20, qsize: int = 64):  # type: ignore[no-untyped-def]
    from emulator.host.driver import NvmeHost
    from emulator.host.memory import HostMemory
    from emulator.host.transport import VfioUserTransport
    from emulator.vfio_user.client import VfioUserClient
    h = NvmeHost(VfioUserTransport(VfioUserClient(sock), HostMemory(memory)))
    h.init(io_queues=1, qsize=qsize)
    return h


def _probe(sock: str, stop: Any, out: Any) -> None:
    h = _host(sock)
    lat = []
    while not stop.is_set():
        t0 = time.perf_counter()
        h.read(2, 0, 8)
        lat.append(time.perf_counter() - t0)
        time.sleep(0.002)
    h.close()
    out.put(lat)


def _scatter(h, count: int) -> None:  # type: ignore[no-untyped-def]
    for i in range(count):  # 4 KiB every 128 KiB: many extents to punch
        h.write(1, i * 256, b"\x01" * 4096)


def _load(sock: str, kind: str, count: int) -> float:
    h = _host(sock, memory=64 << 20, qsize=1024)
    try:
        if kind == "reads":
            buf = h.mem.alloc(4 << 20)
            p1, p2, _ = h.build_prps(buf, 4 << 20)
            cids = [h.submit(1, 0x02, 1, p1, p2, cdw12=8191, ring=False) for _ in range(count)]
        elif kind == "flush":
            cids = [h.submit(1, 0x00, 1, ring=False) for _ in range(count)]
        elif kind == "copy":
            buf = h.mem.alloc(8192)  # 128 format-0 Source Range entries of 64 LBAs (NVM CS Figure 43)
            h.mem.write(buf, b"".join(struct.pack("<I4xQH14x", 0, k * 64, 63) for k in range(128)))
            cids = [h.submit(1, 0x19, 1, buf, buf + 4096, cdw10=(1 << 20) + (k % 64) * 8192, cdw12=127,
                             ring=False) for k in range(count)]
        elif kind == "dealloc":
            _scatter(h, count)
            buf = h.mem.alloc(4096)  # one range over the whole namespace (NVM CS Figure 62)
            h.mem.write(buf, struct.pack("<IIQ", 0, (1 << 30) // 512, 0))
            cids = [h.submit(1, 0x09, 1, buf, 0, cdw11=4, ring=False)]
        elif kind == "format":
            _scatter(h, count)
            cids = [h.submit(0, 0x80, 1, cdw10=1 << 9, ring=False)]  # SES 001b: user data erase
        else:
            raise ValueError(kind)
        qid = 0 if kind == "format" else 1
        t0 = time.perf_counter()
        h.ring_sq(qid)
        for cid in cids:
            c = h.wait(qid, cid, timeout=300)
            if not c.ok:
                raise RuntimeError(f"{kind}: {c}")
        return time.perf_counter() - t0
    finally:
        h.close()


def measure(kind: str, count: int, loop_debug: bool) -> str:
    command = [sys.executable, "-m", "emulator.reliability.starve", "--serve-with-loop-debug"] if loop_debug else None
    t = Target(config=CONFIG, command=command)
    t.start()
    try:
        stop, out = mp.Event(), mp.Queue()
        prober = mp.Process(target=_probe, args=(t.sockets[1], stop, out))
        prober.start()
        time.sleep(1.0)
        took = _load(t.sockets[0], kind, count)
        time.sleep(0.3)
        stop.set()
        lat = sorted(x * 1000 for x in out.get())
        prober.join()
        line = (f"{kind} x{count}: {took:.2f} s; other controller's 4 KiB read: n={len(lat)} "
                f"median {statistics.median(lat):.1f} ms, p99 {lat[max(0, int(len(lat) * 0.99) - 1)]:.1f} ms, "
                f"max {lat[-1]:.1f} ms; load average {os.getloadavg()[0]:.1f}")
    finally:
        t.stop()
    if loop_debug:
        slow = [float(x) * 1000 for x in _TOOK.findall(t.log_path.read_text(errors="replace"))]
        line += f"; loop callbacks > {SLOW_CALLBACK * 1000:.0f} ms: {len(slow)}, longest {max(slow, default=0):.0f} ms"
    t.cleanup()
    return line


def _serve_with_loop_debug(argv: list[str]) -> int:
    """``nvme-emu serve`` with asyncio debug mode: callbacks over SLOW_CALLBACK are logged."""
    import asyncio
    new_loop = asyncio.new_event_loop

    def debug_loop() -> asyncio.AbstractEventLoop:
        loop = new_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = SLOW_CALLBACK
        return loop
    asyncio.new_event_loop = debug_loop  # type: ignore[assignment]
    from emulator.cli import main as cli_main
    return cli_main(["serve", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-with-loop-debug"]:
        return _serve_with_loop_debug(argv[1:])
    ap = argparse.ArgumentParser(prog="starve", description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["reads", "flush", "dealloc", "copy", "format"])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--loop-debug", action="store_true")
    a = ap.parse_args(argv)
    for _ in range(a.runs):
        print(measure(a.kind, a.count, a.loop_debug), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
