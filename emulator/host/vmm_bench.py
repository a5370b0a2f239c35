"""Benchmark: vfio-user migration v2 of a VM with a 1 GiB namespace under I/O (issue 15).

    bash scripts/bench-vfio-migration [--size 1GiB] [--allocated 256MiB] [--writes 0,64,256,1024]
                                      [--queues 1,16] [--ram 64MiB]

Two emulator processes (A, B), each with its own backing file; A's file is
prefilled with ``--allocated`` bytes of data in 1 MiB extents spread over the
namespace.  A VMM-style client (emulator/host/vmm.py) drives the controller
with ``--queues`` I/O queue pairs (more queues: a bigger controller state) and
runs random 4 KiB I/O (60% writes) while it migrates the VM A -> B: ``--writes``
commands after each pre-copy round (the last burst just before the stop).  Per case
it reports the stop-copy downtime (source STOP_COPY sent -> destination
RUNNING) and the stream: total, stop-copy part, and in the stop-copy part the
user data, the Controller State and the PCI function state (the stream's own
sections, counted as they pass), plus the data the guest dirtied.  Wall-clock
numbers on a shared machine: indicative only.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from emulator.guest.emuproc import EmulatorProcess
from emulator.host.guest_io import BLOCK, RandomIo
from emulator.host.vmm import Vmm
from emulator.subsystem.config import parse_size
from emulator.subsystem.migstream import Kind, StreamParser


def _config(d: Path, size: int) -> Path:
    cfg = {"state_dir": str(d), "namespaces": [{"nsid": 1, "file": "ns1.img", "size": size, "lba_size": 512}],
           "controllers": [{"cntlid": 1, "socket": "c.sock", "type": "io", "max_io_queues": 16}]}
    path = d / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _prefill(path: Path, size: int, allocated: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    extents = allocated >> 20
    slots = sorted(rng.sample(range(size >> 20), min(extents, size >> 20)))
    with open(path, "r+b" if path.exists() else "w+b") as f:
        f.truncate(size)
        for slot in slots:
            f.seek(slot << 20)
            f.write(os.urandom(1 << 20))


def run_case(size: int, allocated: int, writes: int, queues: int, ram: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="vbench-"))
    procs: list[EmulatorProcess] = []
    try:
        for n in "ab":
            (root / n).mkdir()
        _prefill(root / "a" / "ns1.img", size, allocated)
        for n in "ab":
            p = EmulatorProcess(_config(root / n, size), root / f"{n}.log", name=n)
            p.start()
            procs.append(p)
        vmm = Vmm(str(procs[0].sockets[0]), ram_bytes=ram, io_queues=queues)
        guest = RandomIo(vmm.host, 1, size // BLOCK, seed=7)
        parser = StreamParser()
        stop_sections: dict[str, int] = {k.name: 0 for k in Kind}

        def tap(data: bytes, stop_copy: bool) -> None:
            for kind, body in parser.feed(data):
                if stop_copy:
                    stop_sections[kind.name] += len(body) + 16
        w0 = guest.writes
        rep = vmm.migrate(str(procs[1].sockets[0]), lambda: guest.burst(writes), small_bytes=1 << 20, on_stream=tap)
        guest.drain()
        dirtied = (guest.writes - w0) * BLOCK
        vmm.close()
        return {"writes_per_round": writes, "queues": queues, "rounds": rep.rounds,
                "downtime_ms": rep.downtime_ms, "total_s": rep.total_ms / 1000,
                "stream_mib": rep.stream_bytes / 2**20, "stop_copy_kib": rep.stream_bytes_stop_copy / 1024,
                "stop_data_kib": stop_sections["DATA"] / 1024, "ctrl_state_kib": stop_sections["CONTROLLER"] / 1024,
                "pci_state_kib": stop_sections["PCI"] / 1024, "guest_dirtied_kib": dirtied / 1024,
                "allocated_mib": allocated / 2**20, "ram_copied_mib": rep.ram_bytes_copied / 2**20}
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--allocated", default="256MiB")
    ap.add_argument("--writes", default="0,64,256,1024")
    ap.add_argument("--queues", default="1,16")
    ap.add_argument("--ram", default="64MiB")
    a = ap.parse_args(argv)
    size, allocated, ram = parse_size(a.size, "size"), parse_size(a.allocated, "allocated"), parse_size(a.ram, "ram")
    cols = ["queues", "writes_per_round", "rounds", "downtime_ms", "total_s", "stream_mib", "stop_copy_kib",
            "stop_data_kib", "ctrl_state_kib", "pci_state_kib", "guest_dirtied_kib"]
    print(f"namespace {a.size}, {a.allocated} allocated, VM RAM {a.ram}")
    print(" ".join(f"{c:>17}" for c in cols))
    for q in (int(x) for x in a.queues.split(",")):
        for w in (int(x) for x in a.writes.split(",")):
            r = run_case(size, allocated, w, q, ram)
            print(" ".join(f"{r[c]:>17.1f}" if isinstance(r[c], float) else f"{r[c]:>17}" for c in cols), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
