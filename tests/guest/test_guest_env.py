"""The guest tool box itself: manifest, QEMU command line, and a real boot on QEMU's own NVMe."""
from __future__ import annotations

import argparse
import re
import shlex
import time
from pathlib import Path

import pytest

from emulator.guest import scenario
from emulator.guest.env import GuestEnv
from emulator.guest.qemu import (GuestFailed, GuestSpec, GuestTimeout, QemuNvme, VfioUserDevice,
                                 format_command, qemu_command)

pytestmark = pytest.mark.guest
REPO = Path(__file__).resolve().parents[2]


def test_manifest_describes_a_usable_tool_box(guest_env: GuestEnv) -> None:
    m = re.match(r"(\d+)\.(\d+)", guest_env.versions["qemu"])
    assert m and (int(m[1]), int(m[2])) >= (10, 1), guest_env.versions
    assert guest_env.kernel.is_file()
    for tool in ("busybox", "nvme", "fio", "mkfs.ext4", "e2fsck"):
        assert guest_env.tool(tool).exists(), tool
    assert guest_env.versions["nvme-cli"] >= "2.13"
    for tool in ("sfdisk", "mkfs.fat", "mcopy", "mmd", "syslinux", "extlinux", "objcopy", "mke2fs"):
        assert guest_env.host_tool(tool).exists(), tool
    for name in ("ovmf_code", "ovmf_vars", "syslinux_mbr", "efi_stub"):
        assert guest_env.file(name).is_file(), name


def test_qemu_command_line_boots_firmware_from_a_disk(guest_env: GuestEnv, tmp_path: Path) -> None:
    spec = GuestSpec(init="", kernel_boot=False, firmware="ovmf",
                     vfio_user=[VfioUserDevice("/run/x/c1.sock", props={"bootindex": 1})])
    argv = qemu_command(guest_env, spec, tmp_path / "initrd.img")
    joined = " ".join(argv)
    assert "-kernel" not in argv and "-initrd" not in argv and "-append" not in argv
    assert '"bootindex":1' in joined
    assert f"readonly=on,file={guest_env.file('ovmf_code')}" in joined
    assert f"file={tmp_path / 'ovmf-vars.fd'}" in joined


def test_qemu_command_line_places_devices_on_root_ports(guest_env: GuestEnv, tmp_path: Path) -> None:
    spec = GuestSpec(init="true", vfio_user=[VfioUserDevice("/run/x/c1.sock"), VfioUserDevice("/run/x/c2.sock")],
                     qemu_nvme=[QemuNvme(tmp_path / "q.img")])
    argv = qemu_command(guest_env, spec, tmp_path / "initrd.img", qmp_socket=tmp_path / "qmp.sock")
    assert argv[:len(guest_env.qemu_argv)] == guest_env.qemu_argv
    joined = " ".join(argv)
    for must in ("-no-reboot", "-nographic", "accel=tcg", "memory-backend=mem0", "share=on", "-smp 1",
                 "console=ttyS0", "-cpu max"):
        assert must in joined
    assert joined.count("pcie-root-port") == 3
    assert '"driver":"vfio-user-pci"' in joined and '"bus":"rp2"' in joined
    assert "nvme,id=qnvme0,bus=rp3" in joined
    # the printed form is copy-pasteable: the shell gives back the same argv
    assert shlex.split(format_command(argv).replace("\\\n", " ")) == argv


def test_guest_boots_with_qemu_nvme_and_has_the_tool_box(boot_guest, guest_workdir: Path) -> None:
    t0 = time.monotonic()
    res = boot_guest(r"""
wait_dev /dev/nvme0n1 30 && pass nvme_dev || fail nvme_dev "no /dev/nvme0n1"
capture nvme_list nvme list
capture lm_help nvme lm help
check fio fio --version
check mkfs mkfs.ext4 -q -F /dev/nvme0n1
check fsck e2fsck -f -n /dev/nvme0n1
check dd_direct dd if=/dev/zero of=/dev/nvme0n1 bs=4096 count=16 oflag=direct
""", qemu_nvme=[QemuNvme(guest_workdir / "disk.img", serial="TOOLBOX0001", size=64 << 20)], timeout=120)
    wall = time.monotonic() - t0
    assert res.ok, res.summary()
    assert "TOOLBOX0001" in res.outputs["nvme_list"]
    assert res.output_rc["lm_help"] == 0
    for sub in ("create-cdq", "track-send", "migration-send", "migration-recv"):
        assert sub in res.outputs["lm_help"], sub
    assert {"nvme_dev", "fio", "mkfs", "fsck", "dd_direct"} <= set(res.passed)
    assert float(res.results["init_uptime_s"]) > 0
    print(f"guest boot to /init {res.boot_seconds:.1f} s, whole run {wall:.1f} s")


def test_timeout_kills_qemu_and_emulator_and_reports_both_logs(boot_guest, emulator,
                                                               fake_emulator_cmd: list[str]) -> None:
    emu = emulator(None, name="fake", command=fake_emulator_cmd)
    guest = boot_guest("sleep 600", wait=False)
    guest.wait_for("RESULT", "init_uptime_s", timeout=120)
    with pytest.raises(GuestTimeout) as ei:
        guest.wait_for("PASS", "never", timeout=2)
    msg = str(ei.value)
    assert "guest console (tail)" in msg and "@@RESULT init_uptime_s=" in msg
    assert "emulator log fake (tail)" in msg and "listening on" in msg
    assert not guest.running and not emu.running
    assert guest.console_log.exists()


def test_guest_without_done_marker_is_a_failure(boot_guest) -> None:
    with pytest.raises(GuestFailed, match="without @@DONE"):
        boot_guest("trap - EXIT; echo '@@FAIL early' ; poweroff -f", timeout=120)


def test_scenarios_print_copy_pasteable_command_lines(guest_env: GuestEnv, guest_workdir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("single-disk", "mmc-and-migratable", "two-instances", "live-migration"):
        ap = argparse.ArgumentParser()
        scenario.add_arguments(ap)
        args = ap.parse_args([str(REPO / "qemu-configs" / f"{name}.yaml"), "--workdir",
                              str(guest_workdir / name), "--print-only"])
        assert scenario.run(args) == 0
        out = capsys.readouterr().out
        assert '"driver":"vfio-user-pci"' in out, out
        cmd = out[out.index("QEMU_MODULE_DIR=" if guest_env.qemu_env else guest_env.qemu_argv[0]):]
        assert (guest_workdir / name / f"{'source-vm' if name == 'two-instances' else 'vm'}" / "initrd.img").is_file()
        assert "-initrd" in cmd
        if name == "two-instances":
            assert "-incoming" in out and out.count("qmp.sock") >= 2


def test_scenario_with_fake_emulator_starts_and_stops_it(guest_env: GuestEnv, guest_workdir: Path,
                                                         fake_emulator_cmd: list[str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # --boot against a fake emulator: QEMU cannot talk vfio-user to it, so the boot fails
    # cleanly, the emulator is stopped, and the error names QEMU's complaint.
    ap = argparse.ArgumentParser()
    scenario.add_arguments(ap)
    args = ap.parse_args([str(REPO / "qemu-configs" / "single-disk.yaml"), "--workdir", str(guest_workdir),
                          "--boot", "--timeout", "60", "--emulator-cmd", shlex.join(fake_emulator_cmd)])
    assert scenario.run(args) == 1
    captured = capsys.readouterr()
    assert "listening on" in captured.out
    assert "vfio-user" in captured.err and "stopped (status 0)" in captured.out


def test_demo_runs_end_to_end_on_the_emulator(guest_env: GuestEnv, guest_workdir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`bash scripts/demo` = setup + `python -m emulator demo`: must pass on the real emulator."""
    from emulator.guest import demo
    ap = argparse.ArgumentParser()
    demo.add_arguments(ap)
    rc = demo.run(ap.parse_args(["--workdir", str(guest_workdir), "--timeout", "300"]))
    out = capsys.readouterr()
    assert rc == 0, out.out[-4000:] + out.err[-4000:]
    assert "demo PASSED" in out.out and "PASS  data_md5" in out.out and "/dev/nvme0n1" in out.out
