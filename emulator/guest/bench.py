"""Side-by-side guest benchmark: QEMU's built-in NVMe vs nvme-emu over vfio-user.

One TCG guest gets both disks (same size, same host page cache situation) and
runs the same fio jobs on each, in one run:

- 4 KiB random read, QD32, libaio, O_DIRECT
- 128 KiB sequential read, QD4 (a 1 MiB request would exceed our MDTS split)

Prints a table with the emulator/QEMU ratio.  Run: ``bash scripts/bench-guest``
(or ``python -m emulator.guest.bench``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from emulator.guest.emuproc import EmulatorProcess
from emulator.guest.env import GuestEnv
from emulator.guest.qemu import GuestSpec, QemuNvme, VfioUserDevice, run
from emulator.vfio_user.dmawrite import DEFAULT_MODE, MODES

SIZE = 256 << 20
MODEL = "nvme-emu bench"

BODY = r"""
find_dev() {  # find_dev MODEL_SUBSTRING -> /dev/nvmeXn1
    for c in /sys/class/nvme/nvme*; do
        if grep -q "$1" "$c/model" 2>/dev/null; then
            for n in /dev/$(basename $c)n1; do echo $n; return; done
        fi
    done
}
i=0; while [ $i -lt 300 ]; do
    [ -n "$(find_dev 'nvme-emu')" ] && [ -n "$(find_dev 'QEMU')" ] && break
    sleep 0.1; i=$((i + 1))
done
EMU=$(find_dev 'nvme-emu'); QEMU=$(find_dev 'QEMU')
[ -n "$EMU" ] && [ -n "$QEMU" ] && pass both_disks || { fail both_disks "emu=$EMU qemu=$QEMU"; exit 0; }
dd if=/dev/urandom of=/tmp/fill bs=1M count=16 2>/dev/null
for DEV in $QEMU $EMU; do  # fill the region so both read real data, not holes
    k=0; while [ $k -lt 4 ]; do
        dd if=/tmp/fill of=$DEV bs=1M seek=$((k * 16)) oflag=direct 2>/dev/null; k=$((k + 1))
    done
done
r=0
while [ $r -lt @ROUNDS@ ]; do
  r=$((r + 1))
  # alternate the order from round to round
  [ $((r % 2)) -eq 1 ] && ORDER="qemu emu" || ORDER="emu qemu"
  for name in $ORDER; do
    [ $name = emu ] && DEV=$EMU || DEV=$QEMU
    fio --name=rr --filename=$DEV --rw=randread --bs=4k --iodepth=32 --ioengine=libaio \
        --direct=1 --size=64m --time_based --runtime=@RUNTIME@ --ramp_time=1 \
        --output-format=terse --terse-version=3 > /tmp/rr.out 2>&1
    result ${name}_randread_iops_$r "$(cut -d';' -f8 /tmp/rr.out)"
    fio --name=sr --filename=$DEV --rw=read --bs=128k --iodepth=4 --ioengine=libaio \
        --direct=1 --size=64m --time_based --runtime=@RUNTIME@ --ramp_time=1 \
        --output-format=terse --terse-version=3 > /tmp/sr.out 2>&1
    result ${name}_seqread_kibs_$r "$(cut -d';' -f7 /tmp/sr.out)"
  done
done
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    p.add_argument("--rounds", type=int, default=3, help="rounds (order alternates); medians are reported")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--visible-writes", choices=MODES, default=DEFAULT_MODE,
                   help="the emulator's --visible-writes mode (all: every device write as a DMA_WRITE)")


def run_bench(runtime: int, workdir: Path | None = None, rounds: int = 3,
              visible_writes: str = DEFAULT_MODE) -> dict[str, float]:
    env = GuestEnv.load()
    wd = workdir or Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    wd.mkdir(parents=True, exist_ok=True)
    cfg = {"state_dir": str(wd / "state"),
           "subsystem": {"model": MODEL, "serial": "BENCH0001"},
           "namespaces": [{"nsid": 1, "size": SIZE}],
           "controllers": [{"cntlid": 1, "type": "io", "max_io_queues": 4}]}
    cfg_path = wd / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    emu = EmulatorProcess(cfg_path, wd / "emu.log", name="emu", cwd=wd,
                          command=[sys.executable, "-m", "emulator", "serve", "--visible-writes", visible_writes])
    emu.start()
    try:
        spec = GuestSpec(init=BODY.replace("@RUNTIME@", str(runtime)).replace("@ROUNDS@", str(rounds)),
                         vfio_user=[VfioUserDevice(emu.sockets[0])],
                         qemu_nvme=[QemuNvme(wd / "qemu.img", serial="QEMUBENCH", size=SIZE)])
        res = run(env, spec, wd / "guest", timeout=120 + 6 * runtime * rounds)
    finally:
        emu.stop()
    if not res.ok:
        raise SystemExit(f"benchmark guest failed: {res.summary()}")
    samples: dict[str, list[float]] = {}
    for k, v in res.results.items():
        key, _, rnd = k.rpartition("_")
        if key.endswith(("_iops", "_kibs")) and rnd.isdigit() and v:
            samples.setdefault(key, []).append(float(v))
    return {k: statistics.median(v) for k, v in samples.items()}


def report(r: dict[str, float]) -> str:
    rows = [("fio 4 KiB randread QD32 (IOPS)", "randread_iops"),
            ("fio 128 KiB seq read QD4 (MiB/s)", "seqread_kibs")]
    out = [f"{'job':36} {'QEMU nvme':>12} {'nvme-emu':>12} {'ratio':>7}"]
    for label, key in rows:
        q, e = r.get(f"qemu_{key}", 0.0), r.get(f"emu_{key}", 0.0)
        if key.endswith("kibs"):
            q, e = q / 1024, e / 1024
        ratio = e / q if q else float("nan")
        out.append(f"{label:36} {q:12.1f} {e:12.1f} {ratio:7.2f}")
    return "\n".join(out)


def run_cli(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    r = run_bench(args.runtime, args.workdir, args.rounds, args.visible_writes)
    print(report(r))
    print(f"(one TCG guest, -smp 1, both disks in the same run; median of {args.rounds} rounds "
          f"of {args.runtime} s, order alternating; --visible-writes {args.visible_writes}; "
          f"{time.monotonic() - t0:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
