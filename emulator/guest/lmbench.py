"""Live migration benchmark (``scripts/bench-migration``), not a test.

1. Downtime under guest fio 4 KiB randwrite QD16, with 1 and 4 I/O queue pairs
   (a 1-vCPU guest with one fio job at QD16; a 4-vCPU guest with 4 jobs at QD4).
   The guest's view: the longest write latency (fio clat max) of the fio run the
   migration happened in, next to the run before any migration.  The MMH's
   view: Suspend sent -> destination reads the connection.
2. Total time and bytes copied for a 1 GiB namespace 10% and 90% allocated
   (data written into the source's backing file before it starts; a host
   driver stands in for the guest, idle).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from emulator.guest.emuproc import EmulatorProcess
from emulator.guest.env import GuestEnv
from emulator.guest.lmrun import fio_loop_body, fio_max_latency_ms, migrate, write_stop_sentinel
from emulator.guest.qemu import Guest, GuestSpec, VfioUserDevice


def _config(state: Path, size: str, queues: int = 16) -> Path:
    state.mkdir(parents=True, exist_ok=True)
    cfg = {"state_dir": str(state),
           "namespaces": [{"nsid": 1, "file": "ns1.img", "size": size, "lba_size": 512}],
           "controllers": [{"cntlid": 1, "socket": "ctrl1.sock", "type": "io", "namespaces": [1],
                            "max_io_queues": queues},
                           {"cntlid": 2, "socket": "mmc.sock", "type": "mmc", "namespaces": [1]}]}
    path = state.parent / f"{state.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _emulators(work: Path, size: str) -> tuple[EmulatorProcess, EmulatorProcess]:
    a = EmulatorProcess(_config(work / "a", size), work / "a.log", name="a", cwd=work)
    b = EmulatorProcess(_config(work / "b", size), work / "b.log", name="b", cwd=work)
    a.start()
    b.start()
    return a, b


def downtime(work: Path, queues: int, migrations: int, ns_mib: int = 64) -> dict[str, Any]:
    env = GuestEnv.load()
    a, b = _emulators(work, f"{ns_mib}MiB")
    jobs, depth = (1, 16) if queues == 1 else (queues, 16 // queues)
    spec = GuestSpec(init=fio_loop_body(ns_mib, run_mib=8, areas=4, jobs=jobs, iodepth=depth),
                     vfio_user=[VfioUserDevice(a.sockets[0])], extra_args=["-smp", str(queues)])
    reports = []
    try:
        with Guest(env, spec, work / "guest", emulators=[a, b], name="guest") as g:
            g.start()
            path = [a, b] * (migrations // 2 + 1)
            for n in range(migrations):
                g.wait_for("PASS", f"writing_{n + 2}", timeout=600)  # run 1: the baseline
                src, dst = path[n], path[n + 1]
                r = migrate(work / src.name / "control.sock", work / dst.name / "control.sock")
                if not r.ok:
                    raise RuntimeError(r.error)
                reports.append(r)
            last = path[migrations]
            write_stop_sentinel(last.sockets[1], ns_mib << 20)
            res = g.wait(timeout=900, check=False)
    finally:
        a.stop()
        b.stop()
    lat = {int(k.split("_")[1]): fio_max_latency_ms(v) for k, v in res.outputs.items()
           if k.startswith("fio_") and k.split("_")[1].isdigit()}
    return {"io_queue_pairs": int(res.results.get("io_queues", 0)), "fio_jobs": jobs, "iodepth": depth,
            "fio_failures": res.results.get("fio_failures"),
            "baseline_max_latency_ms": lat.get(1),
            "guest_max_latency_ms": [lat.get(n + 2) for n in range(migrations)],
            "mmh_downtime_ms": [round(r.downtime_ms, 1) for r in reports],
            "downtime_steps_ms": [{k: round(v, 1) for k, v in r.downtime_steps_ms.items()} for r in reports]}


def bulk(work: Path, percent: int) -> dict[str, Any]:
    """1 GiB namespace, ``percent`` % allocated in 1 MiB extents spread over it."""
    state = work / "a"
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "ns1.img", "wb") as f:
        f.truncate(1 << 30)
        chunk = os.urandom(1 << 20)
        for i in range(1024):
            if (i * percent) // 100 != ((i + 1) * percent) // 100:
                f.seek(i << 20)
                f.write(chunk)
    a, b = _emulators(work, "1GiB")
    from emulator.host.driver import NvmeHost
    from emulator.host.memory import HostMemory
    from emulator.host.transport import VfioUserTransport
    from emulator.vfio_user.client import VfioUserClient
    mem = HostMemory(8 << 20, name="bench-guest")
    guest = NvmeHost(VfioUserTransport(VfioUserClient(str(a.sockets[0])), mem), mem)
    try:
        guest.init(io_queues=1)
        t0 = time.monotonic()
        r = migrate(work / "a" / "control.sock", work / "b" / "control.sock")
        wall = time.monotonic() - t0
        if not r.ok:
            raise RuntimeError(r.error)
    finally:
        guest.close()
        mem.close()
        a.stop()
        b.stop()
    return {"allocated_percent": percent, "bytes_allocated": r.bytes_allocated, "bytes_copied": r.bytes_copied,
            "total_s": round(r.total_ms / 1000, 2), "wall_s": round(wall, 2),
            "copy_MiB_per_s": round(r.bytes_copied / 2**20 / max(r.phases_ms.get("pre-copy", 1) / 1000, 1e-6), 1),
            "downtime_ms": round(r.downtime_ms, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench-migration", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--migrations", type=int, default=3, help="migrations per queue setting (default 3)")
    ap.add_argument("--queues", default="1,4", help="I/O queue pairs to measure (default 1,4)")
    ap.add_argument("--skip-guest", action="store_true", help="only the 1 GiB bulk copies")
    ap.add_argument("--skip-bulk", action="store_true", help="only the guest downtime")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"downtime": [], "bulk": []}
    with tempfile.TemporaryDirectory(prefix="lmb-") as tmp:
        work = Path(tmp)
        if not args.skip_guest:
            for q in (int(x) for x in args.queues.split(",")):
                d = downtime(work / f"q{q}", q, args.migrations)
                out["downtime"].append(d)
                print(f"queues {d['io_queue_pairs']} (fio {d['fio_jobs']} x QD{d['iodepth']}): "
                      f"guest max write latency {d['guest_max_latency_ms']} ms "
                      f"(baseline run {d['baseline_max_latency_ms']} ms), MMH downtime {d['mmh_downtime_ms']} ms "
                      f"(median {statistics.median(d['mmh_downtime_ms']):.1f}), fio failures {d['fio_failures']}",
                      flush=True)
                for steps in d["downtime_steps_ms"]:
                    print(f"    downtime steps (ms): {steps}", flush=True)
        if not args.skip_bulk:
            for pct in (10, 90):
                r = bulk(work / f"bulk{pct}", pct)
                out["bulk"].append(r)
                print(f"1 GiB, {pct}% allocated: {r['bytes_copied'] / 2**20:.0f} MiB copied of "
                      f"{r['bytes_allocated'] / 2**20:.0f} MiB allocated in {r['total_s']} s "
                      f"({r['copy_MiB_per_s']} MiB/s), downtime {r['downtime_ms']} ms", flush=True)
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
