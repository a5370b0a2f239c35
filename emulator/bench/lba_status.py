"""Benchmark: Get LBA Status (ATYPE 02h) over a 1 TiB sparse namespace (issue 4).

    bash scripts/bench-lba-status [--size 1TiB] [--granules 10000] [--repeat 5]

Builds a sparse namespace (512-byte LBAs, TLBAAG 8 = 4 KiB granules), writes
one LBA into each of N scattered granules through the host driver, then
times a full scan three ways: the raw bitmap (AllocationMap.runs), and the
Get LBA Status command walked with continuation (CMPC = 1h -> next SLBA)
through the host driver, in process (DirectTransport) and over vfio-user
when that transport is available.  Prints a table; numbers are wall-clock
medians.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from emulator.host.driver import NvmeHost
from emulator.host.memory import HostMemory
from emulator.host.transport import DirectTransport
from emulator.nvme.config import ControllerConfig, NamespaceConfig
from emulator.nvme.dispatch import new_controller
from emulator.nvme.lba_status import LBA_STATUS_DESCRIPTOR, LBA_STATUS_HEADER
from emulator.nvme.namespace import Namespace
from emulator.nvme.spec import AdminOpcode
from emulator.subsystem.config import parse_size
from emulator.subsystem.subsystem import Subsystem

LBA_SIZE, TLBAAG, MDTS = 512, 8, 5


def full_scan(h: NvmeHost, nsid: int, mndw: int) -> tuple[int, int]:
    """Walk the whole namespace with Get LBA Status; returns (descriptors, commands)."""
    slba = descriptors = commands = 0
    while True:
        c = h.admin(AdminOpcode.GET_LBA_STATUS, nsid=nsid, read_len=(mndw + 1) * 4, cdw10=slba & 0xFFFFFFFF,
                    cdw11=slba >> 32, cdw12=mndw, cdw13=0x02 << 24)
        commands += 1
        if not c.ok:
            raise RuntimeError(f"Get LBA Status failed: {c}")
        nlsd, cmpc = LBA_STATUS_HEADER.unpack_from(c.data)
        descriptors += nlsd
        if cmpc == 2:
            return descriptors, commands
        off = LBA_STATUS_HEADER.size + (nlsd - 1) * LBA_STATUS_DESCRIPTOR.size
        dslba, nlb = struct.unpack_from("<QI", c.data, off)
        slba = dslba + nlb + 1


def timed(fn: Callable[[], Any], repeat: int) -> tuple[str, Any]:
    """'median (min)' in ms over ``repeat`` runs, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return f"{statistics.median(times) * 1e3:7.2f} ({min(times) * 1e3:6.2f})", out


def vfio_user_host(state: Path, size: int) -> tuple[NvmeHost, Any] | None:
    """A host over a real vfio-user socket on the same files, if the transport is in the tree."""
    try:
        from emulator.host.transport import VfioUserTransport
        from emulator.subsystem.config import parse_config
        from emulator.subsystem.runtime import RuntimeThread
        from emulator.vfio_user.client import VfioUserClient
    except ImportError:
        return None
    cfg = parse_config({"state_dir": str(state),
                        "namespaces": [{"nsid": 1, "file": "ns1.img", "size": size, "lba_size": LBA_SIZE,
                                        "tlbaag": TLBAAG}],
                        "controllers": [{"cntlid": 1, "socket": "c1.sock", "type": "io", "mdts": MDTS}]},
                       state)
    rt = RuntimeThread(cfg).start()
    h = NvmeHost(VfioUserTransport(VfioUserClient(rt.socket(1)), HostMemory(8 << 20)))
    h.init()
    return h, rt


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "--size")
    base = Path(args.dir) if args.dir else None
    state = Path(tempfile.mkdtemp(prefix="bench-lba-", dir=base))
    try:
        return _bench(state, size, args)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _bench(state: Path, size: int, args: argparse.Namespace) -> int:
    nsze = size // LBA_SIZE
    sub = Subsystem()
    t0 = time.perf_counter()
    ns = Namespace(NamespaceConfig(1, state / "ns1.img", size, LBA_SIZE, TLBAAG), sub.nqn)
    sub.namespaces[1] = ns
    ctrl = new_controller(ControllerConfig(1, namespaces=(1,), mdts=MDTS), sub)
    h = NvmeHost(DirectTransport(ctrl, HostMemory(8 << 20)))
    h.init()
    rng = np.random.default_rng(args.seed)
    amap = ns.allocation
    granules = np.sort(rng.choice(amap.granules, size=args.granules, replace=False))
    offsets = rng.integers(0, TLBAAG, size=args.granules)
    for g, off in zip(granules.tolist(), offsets.tolist()):
        c = h.write(1, g * TLBAAG + off, b"\xa5" * LBA_SIZE)
        if not c.ok:
            raise RuntimeError(f"write failed: {c}")
    assert h.flush(1).ok
    setup = time.perf_counter() - t0
    want_runs = len(amap.runs(0, amap.granules)[0])

    rows: list[tuple[str, str, str, str]] = []
    raw_t, (runs, _) = timed(lambda: amap.runs(0, amap.granules), args.repeat)
    rows.append(("raw bitmap scan (AllocationMap.runs)", f"{len(runs)} runs", "-", raw_t))
    nuse_t, _ = timed(lambda: ns.nuse(), args.repeat)
    rows.append(("NUSE (popcount of the bitmap)", f"{ns.nuse()} LBAs", "-", nuse_t))
    buffers = [("4 KiB buffer", 1023), (f"{(1 << MDTS) * 4} KiB buffer (MDTS)", (1 << MDTS) * 1024 - 1)]
    for label, mndw in buffers:
        t, (descs, cmds) = timed(lambda: full_scan(h, 1, mndw), args.repeat)
        assert descs == want_runs, (descs, want_runs)
        rows.append((f"Get LBA Status, in process, {label}", f"{descs} descriptors", str(cmds), t))
    h.close()
    sub.close()
    t0 = time.perf_counter()
    reopened = Namespace(NamespaceConfig(1, state / "ns1.img", size, LBA_SIZE, TLBAAG), sub.nqn)
    reopen_t = time.perf_counter() - t0
    same = reopened.allocation.runs(0, amap.granules)[0].tolist() == runs.tolist()
    reopened.close()
    rows.append(("reopen (sidecar + SEEK_DATA reconcile)", "bits equal" if same else "BITS DIFFER", "-",
                 f"{reopen_t * 1e3:7.2f} (once)"))

    remote = vfio_user_host(state, size)
    if remote is None:
        rows.append(("Get LBA Status over vfio-user", "transport not in the tree", "-", "n/a"))
    else:
        rh, rt = remote
        try:
            for label, mndw in buffers:
                t, (descs, cmds) = timed(lambda: full_scan(rh, 1, mndw), args.repeat)
                assert descs == want_runs, (descs, want_runs)
                rows.append((f"Get LBA Status, vfio-user, {label}", f"{descs} descriptors", str(cmds), t))
        finally:
            rh.close()
            rt.stop()

    bits = amap.memory_bytes * 8
    sidecar = state / "ns1.img.alloc"
    print(f"namespace: {size / (1 << 40):.3g} TiB, {nsze} LBAs of {LBA_SIZE} B, TLBAAG {TLBAAG} "
          f"-> {amap.granules} granules; {args.granules} scattered granules written ({want_runs} runs); "
          f"setup {setup:.1f} s")
    print(f"bitmap: {amap.memory_bytes / (1 << 20):.1f} MiB (mmap of the sidecar), "
          f"{bits / amap.granules:.3f} bit per granule; sidecar blocks stored: "
          f"{os.stat(sidecar).st_blocks * 512 / (1 << 20):.1f} MiB (the pages the writes touched)")
    print(f"time per full scan in ms: median (min) of {args.repeat} runs\n")
    w = max(len(r[0]) for r in rows)
    print(f"{'what':<{w}}  {'result':<26} {'cmds':>5}  {'ms':>16}")
    for name, result, cmds, ms in rows:
        print(f"{name:<{w}}  {result:<26} {cmds:>5}  {ms:>16}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1TiB", help="namespace size (default 1TiB)")
    p.add_argument("--granules", type=int, default=10000, help="scattered allocated granules")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions (median)")
    p.add_argument("--seed", type=int, default=4165)
    p.add_argument("--dir", help="where the sparse files go (default: the temp dir)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
