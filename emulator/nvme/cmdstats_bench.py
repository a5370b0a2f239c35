"""Benchmark: what the per-command statistics (cmdstats) cost on a 4 KiB read.

    bash scripts/bench-stats [--reads 3000] [--rounds 5]

A subsystem runs in this process (its own event loop thread) and the Python
host driver reads 4 KiB over vfio-user, as in the controller tests.  Rounds
alternate between the normal controller and one whose ``cmd_stats.record``
does nothing; each prints the median time per read.  The hook's own cost
(two ``perf_counter_ns`` calls, the byte count and ``record``) is timed apart
with ``timeit``, and set against the time of one read.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

from emulator.nvme.cmdstats import CommandStats


class _Off:
    """Counts nothing; sums the time from fetch to CQE of the I/O commands."""
    def __init__(self) -> None:
        self.n = self.ns = 0

    def record(self, sqid: int, opc: int, status: int, nbytes: int, elapsed_ns: int) -> None:
        if sqid:
            self.n += 1
            self.ns += elapsed_ns


def hook_cost_ns(n: int = 200_000) -> float:
    """Time of the work execute() adds per command, in ns."""
    s = CommandStats()
    ns = {"pc": time.perf_counter_ns, "s": s, "o": type("C", (), {"xfer_bytes": 0, "cmd_t0": 0, "cmd_x0": 0})()}
    stmt = ("o.cmd_t0 = t0 = pc(); o.cmd_x0 = x0 = o.xfer_bytes; o.xfer_bytes += 4096; "
            "s.record(1, 2, 0, o.xfer_bytes - x0, pc() - t0)")
    base = min(timeit.repeat("pass", number=n, repeat=5, globals=ns))
    t = min(timeit.repeat(stmt, number=n, repeat=5, globals=ns))
    return (t - base) / n * 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reads", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    from emulator.host.driver import NvmeHost
    from emulator.host.memory import HostMemory
    from emulator.host.transport import VfioUserTransport
    from emulator.subsystem.config import parse_config
    from emulator.subsystem.runtime import RuntimeThread
    from emulator.vfio_user.client import VfioUserClient

    d = Path(tempfile.mkdtemp(prefix="ne-bench-"))
    cfg = parse_config({"state_dir": str(d), "namespaces": [{"nsid": 1, "size": "16MiB"}],
                        "controllers": [{"cntlid": 1, "type": "io"}]}, d)
    rt = RuntimeThread(cfg).start()
    try:
        assert rt.runtime is not None
        ctrl = rt.runtime.subsystem.controllers[1]
        host = NvmeHost(VfioUserTransport(VfioUserClient(rt.socket(1)), HostMemory(8 << 20)))
        host.init(io_queues=1, qsize=64)
        host.write(1, 0, b"\x5a" * 4096)
        real = ctrl.cmd_stats
        per: dict[str, list[float]] = {"on": [], "off": []}
        off = _Off()
        for r in range(args.rounds * 2 + 1):
            mode = "on" if r % 2 == 0 else "off"
            ctrl.cmd_stats = real if mode == "on" else off
            t0 = time.perf_counter()
            for i in range(args.reads):
                host.read(1, (i % 64) * 8, 8)
            if r:  # round 0 warms up
                per[mode].append((time.perf_counter() - t0) / args.reads * 1e6)
        ctrl.cmd_stats = real
        host.close()
    finally:
        rt.stop()
    execute_us = off.ns / max(off.n, 1) / 1000
    on, off_us = statistics.median(per["on"]), statistics.median(per["off"])
    hook = hook_cost_ns()
    print(f"4 KiB read through the host driver over vfio-user, median of {args.rounds} rounds "
          f"of {args.reads}:")
    print(f"  with statistics      {on:8.1f} us per read")
    print(f"  record() disabled    {off_us:8.1f} us per read   (difference {on - off_us:+.1f} us)")
    print(f"  in the controller    {execute_us:8.1f} us per read   (SQE fetch to CQE posted)")
    print(f"  the hook alone       {hook / 1000:8.3f} us per command = {100 * hook / 1000 / execute_us:.1f}% of "
          f"the controller's time, {100 * hook / 1000 / on:.2f}% of a read through the host driver")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
