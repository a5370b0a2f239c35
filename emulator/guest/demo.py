"""``nvme-emu demo``: the emulator as a real guest's NVMe disk, end to end.

1. start ``python -m emulator serve`` on its embedded default configuration;
2. boot a Linux guest (QEMU, TCG) with a ``vfio-user-pci`` device per listening controller;
3. in the guest: write a random pattern with dd (O_DIRECT) and read it back (md5sum),
   run an fio write+verify job, make an ext4 file system, write a file, fsck it;
4. print nvme-cli's view (``nvme list``, ``nvme id-ctrl``) and the results.

``--qemu-nvme`` runs the same guest on QEMU's own NVMe device instead (no emulator):
a check of the guest side alone.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from emulator.guest.env import GuestEnv, GuestEnvMissing, cache_dir
from emulator.guest.emuproc import EmulatorError, EmulatorProcess
from emulator.guest.qemu import (Guest, GuestError, GuestResult, GuestSpec, QemuNvme, VfioUserDevice,
                                 format_command)

DEMO_BODY = r"""
DEV=""
for i in $(seq 1 300); do
    for d in /dev/nvme*n1; do [ -b "$d" ] && { DEV=$d; break 2; }; done
    sleep 0.1
done
if [ -z "$DEV" ]; then
    fail disk_found "no NVMe namespace block device appeared in the guest"
    capture dmesg sh -c "dmesg | grep -i -E 'nvme|vfio|pci' | tail -n 40"
    exit 0
fi
pass disk_found
result device "$DEV"
CTRL=/dev/$(basename "$DEV" | sed 's/n[0-9]*$//')
capture nvme_list nvme list
capture nvme_id_ctrl sh -c "nvme id-ctrl $CTRL | head -n 20"
capture nvme_id_ns sh -c "nvme id-ns $DEV | head -n 12"

# 1. a raw pattern: 8 MiB of random data written with O_DIRECT, read back, md5 compared
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
W=$(md5sum < /tmp/pattern | cut -d' ' -f1)
dd if=/tmp/pattern of="$DEV" bs=1M oflag=direct conv=fsync 2>&1 | tail -n 1
echo 3 > /proc/sys/vm/drop_caches
dd if="$DEV" of=/tmp/readback bs=1M count=8 iflag=direct 2>&1 | tail -n 1
R=$(md5sum < /tmp/readback | cut -d' ' -f1)
result written_md5 "$W"
result read_md5 "$R"
[ "$W" = "$R" ] && pass data_md5 || fail data_md5 "wrote $W, read back $R"

# 2. fio: random 4 KiB writes with crc32c verify, O_DIRECT, QD 8
check fio_verify fio --name=verify --filename="$DEV" --offset=16M --size=16M --rw=randwrite \
    --bs=4k --direct=1 --ioengine=libaio --iodepth=8 --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --output-format=terse --terse-version=3 --randrepeat=0 >/tmp/fio.out
[ -s /tmp/fio.out ] && result fio_write_iops "$(cut -d';' -f49 /tmp/fio.out)"

# 3. a file system: mkfs.ext4, mount, write a file, unmount, fsck
if check mkfs mkfs.ext4 -q -F "$DEV"; then
    mkdir -p /mnt/d && mount -t ext4 "$DEV" /mnt/d && pass mount || fail mount "mount failed"
    cp /tmp/pattern /mnt/d/pattern && sync
    F=$(md5sum < /mnt/d/pattern | cut -d' ' -f1)
    umount /mnt/d
    mount -t ext4 "$DEV" /mnt/d && F2=$(md5sum < /mnt/d/pattern | cut -d' ' -f1) && umount /mnt/d
    [ "$F2" = "$W" ] && pass file_md5 || fail file_md5 "file read back as $F2, wrote $W"
    check fsck e2fsck -f -n "$DEV"
fi
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=None,
                        help="emulator state, logs, console (default: a new dir under <cache>/demo)")
    parser.add_argument("--qemu-nvme", action="store_true",
                        help="use QEMU's own -device nvme instead of the emulator (checks the guest side)")
    parser.add_argument("--timeout", type=float, default=300.0, help="guest timeout in seconds")
    parser.add_argument("--emulator-cmd", default=None,
                        help="emulator command instead of 'python -m emulator serve' (testing)")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _report(res: GuestResult) -> None:
    for name in ("nvme_list", "nvme_id_ctrl", "nvme_id_ns"):
        if name in res.outputs:
            cmd = {"nvme_list": "nvme list", "nvme_id_ctrl": "nvme id-ctrl | head",
                   "nvme_id_ns": "nvme id-ns | head"}[name]
            print(f"\n[guest]$ {cmd}\n{res.outputs[name]}")
    print()
    for name in res.passed:
        print(f"  PASS  {name}")
    for name, reason in res.failed.items():
        print(f"  FAIL  {name}: {reason}")
    for k in ("device", "written_md5", "read_md5", "fio_write_iops"):
        if k in res.results:
            print(f"  {k:15s} {res.results[k]}")


def run(args: argparse.Namespace) -> int:
    try:
        env = GuestEnv.load()
    except GuestEnvMissing as e:
        print(f"nvme-emu demo: {e}", file=sys.stderr)
        return 2
    base = cache_dir() / "demo"
    base.mkdir(parents=True, exist_ok=True)
    for old in sorted(p for p in base.iterdir() if p.is_dir())[:-3]:   # keep the last 3 runs
        shutil.rmtree(old, ignore_errors=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=base))
    workdir.mkdir(parents=True, exist_ok=True)
    _say(f"QEMU {env.versions.get('qemu', '?')}, guest kernel {env.versions.get('kernel', '?')}, "
         f"nvme-cli {env.versions.get('nvme-cli', '?')}; work dir {workdir}")
    spec = GuestSpec(init=DEMO_BODY)
    emu: EmulatorProcess | None = None
    if args.qemu_nvme:
        spec.qemu_nvme.append(QemuNvme(workdir / "qemu-nvme.img", serial="QEMUNVME0001", size=256 << 20))
        _say("using QEMU's built-in NVMe device (no emulator)")
    else:
        command = shlex.split(args.emulator_cmd) if args.emulator_cmd else None
        emu = EmulatorProcess(None, workdir / "emulator.log", name="emulator", command=command,
                              args=["--state-dir", str(workdir / "state")], cwd=workdir, settle=1.0)
        _say(f"starting the emulator: {' '.join(emu.argv)}  (log {emu.log_path})")
        try:
            sockets = emu.start(timeout=60)
        except EmulatorError as e:
            print(f"[demo] {e}", file=sys.stderr)
            return 1
        for s in sockets:
            _say(f"emulator listening on {s}")
            spec.vfio_user.append(VfioUserDevice(s, id=f"nvme-emu{len(spec.vfio_user)}"))
    try:
        with Guest(env, spec, workdir / "guest", emulators=[emu] if emu else [], name="demo-guest") as g:
            _say("booting the guest (TCG, 1 vCPU); QEMU command line:")
            print(format_command(g.command, env.qemu_env), flush=True)
            g.start()
            g.wait_for("RESULT", "init_uptime_s", timeout=120)
            _say(f"guest /init running after {g.result.boot_seconds or 0:.1f} s; "
                 "writing and verifying data (dd + md5sum, fio verify, ext4)")
            res = g.wait(timeout=args.timeout, check=False)
    except GuestError as e:
        print(f"[demo] {e}", file=sys.stderr)
        if emu:
            emu.stop()
        return 1
    _report(res)
    rc = 0 if res.ok and "data_md5" in res.passed else 1
    if emu:
        status = emu.stop()
        _say(f"emulator stopped (status {status}); log {emu.log_path}")
        if status != 0:
            rc = 1
    _say(f"guest console log {res.console_log}; whole guest run {res.wall_seconds:.1f} s")
    _say("demo PASSED" if rc == 0 else "demo FAILED")
    return rc
