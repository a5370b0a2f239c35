"""A guest boots from an nvme-emu disk: SeaBIOS (legacy BIOS) and OVMF (UEFI) (issue 16).

The test builds the disk image from files (no loop device, no mount), puts it
behind namespace 1 as its backing file, and boots QEMU without ``-kernel``:
the firmware finds the disk through ``bootindex``.  The initramfs's /init
prints a marker and whether the kernel came up under UEFI (/sys/firmware/efi).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from emulator.guest.diskimage import bios_disk, tiny_initrd, uefi_disk
from emulator.guest.qemu import GuestSpec, VfioUserDevice

pytestmark = pytest.mark.guest

DISK_SIZE = 64 << 20
CMDLINE = "console=ttyS0 panic=-1 quiet"
MARKER = "nvme-emu-disk-boot-ok"
INIT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox echo
if [ -d /sys/firmware/efi ]; then fw=uefi; else fw=bios; fi
/bin/busybox echo "@@RESULT firmware=$fw"
/bin/busybox echo "@@RESULT marker={MARKER}"
/bin/busybox echo "@@DONE"
/bin/busybox poweroff -f
"""


def _boot_from_disk(boot_guest, emulator, guest_env, guest_workdir: Path, firmware: str) -> None:
    state = guest_workdir / "emu"
    state.mkdir()
    initrd = guest_workdir / "initrd.img"
    initrd.write_bytes(tiny_initrd(guest_env, INIT))
    build = bios_disk if firmware == "seabios" else uefi_disk
    build(guest_env, state / "boot.img", guest_env.kernel, initrd, CMDLINE, size=DISK_SIZE)
    emu = emulator({"state_dir": str(state),
                    "namespaces": [{"nsid": 1, "file": "boot.img", "size": DISK_SIZE}],
                    "controllers": [{"cntlid": 1, "type": "io", "max_io_queues": 2}]})
    spec = GuestSpec(init="", kernel_boot=False, firmware=firmware,
                     vfio_user=[VfioUserDevice(emu.sockets[0], props={"bootindex": 1})])
    result = boot_guest(spec, timeout=600, name=firmware)
    assert result.results.get("marker") == MARKER, result.summary()
    assert result.results.get("firmware") == ("bios" if firmware == "seabios" else "uefi")


def test_seabios_boots_from_the_disk(boot_guest, emulator, boot_disk_env, guest_workdir):
    """MBR, then the partition's boot sector, both read to 0x7c00; syslinux loads kernel and initrd."""
    _boot_from_disk(boot_guest, emulator, boot_disk_env, guest_workdir, "seabios")


def test_ovmf_boots_from_the_disk(boot_guest, emulator, boot_disk_env, guest_workdir):
    """OVMF starts EFI/BOOT/BOOTX64.EFI (a UKI: EFI stub + kernel + initrd + cmdline) from the ESP."""
    _boot_from_disk(boot_guest, emulator, boot_disk_env, guest_workdir, "ovmf")
