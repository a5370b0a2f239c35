"""Bootable disk images built from files, without loop devices or mounts.

* :func:`bios_disk`: a DOS partition table, syslinux's MBR code, one bootable
  FAT partition at LBA 2048 holding syslinux (installed with its mtools
  installer, which writes into the image file), ``syslinux.cfg``, the kernel
  and the initramfs.  SeaBIOS loads the MBR to 0x7c00, the MBR loads the
  partition's boot sector to 0x7c00 again, and syslinux loads the rest with
  int 13h: the path of issue 16.
* :func:`uefi_disk`: a GPT with one EFI System Partition (FAT) holding
  ``EFI/BOOT/BOOTX64.EFI``, the default path UEFI firmware boots from a disk.
  That file is a unified kernel image (:func:`uki`): systemd's EFI stub with the
  kernel, the initramfs and the command line as PE sections, so the firmware
  needs no boot entry and no shell script to pass the initrd.
* :func:`ext4_image`: an ext4 file system made from a directory (``mke2fs -d``).
* :func:`tiny_initrd`: busybox and an ``/init`` script (a few hundred KiB).

The host tools (sfdisk, mkfs.fat, mcopy, mmd, syslinux, objcopy, mke2fs) and
files (syslinux's ``mbr.bin``, systemd's ``linuxx64.efi.stub``) come from the
tool-box manifest (``scripts/guest-env`` installs them).
"""
from __future__ import annotations

import os
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping

from emulator.guest.env import GuestEnv
from emulator.guest.initramfs import FileData, run_archive

SECTOR = 512
PART_START = 2048          # first partition at 1 MiB, as partitioning tools do
GPT_BACKUP_SECTORS = 33    # backup GPT header + entries at the end of the disk
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"   # UEFI 2.10 §5.3.3 EFI System Partition
MBR_CODE_SIZE = 440        # boot code in front of the disk signature and the partition table


HOST_TOOLS = ("sfdisk", "mkfs.fat", "mcopy", "mmd", "syslinux", "objcopy", "mke2fs")
FILES = ("syslinux_mbr", "efi_stub", "ovmf_code", "ovmf_vars")


def require_tools(env: GuestEnv) -> None:
    """Raise GuestEnvMissing (naming scripts/guest-env) unless every tool and file is there."""
    for name in HOST_TOOLS:
        env.host_tool(name)
    for name in FILES:
        env.file(name)


class DiskImageError(RuntimeError):
    """A tool failed; the message carries its output."""


def _run(argv: list[str | os.PathLike[str]], stdin: bytes | None = None,
         env: Mapping[str, str] | None = None) -> None:
    r = subprocess.run([str(a) for a in argv], input=stdin, capture_output=True, env=env)
    if r.returncode:
        raise DiskImageError(f"{' '.join(str(a) for a in argv)} failed ({r.returncode}): "
                             f"{(r.stderr or r.stdout).decode(errors='replace').strip()}")


def _mtools_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MTOOLS_SKIP_CHECK"] = "1"   # image files have no drive geometry to check
    return env


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _splice(disk: Path, part: Path, lba: int) -> None:
    """Copy the partition image into the disk at ``lba``, keeping holes sparse."""
    with open(part, "rb") as src, open(disk, "r+b") as dst:
        base = lba * SECTOR
        while chunk := src.read(1 << 20):
            if chunk.count(0) != len(chunk):
                dst.seek(base + src.tell() - len(chunk))
                dst.write(chunk)


def _fat(env: GuestEnv, path: Path, size: int, label: str, hidden: int, files: Mapping[str, Path | bytes]) -> None:
    """A FAT file system image of ``size`` bytes with ``files`` (name -> content) in it."""
    _sparse(path, size)
    _run([env.host_tool("mkfs.fat"), "-h", str(hidden), "-n", label, path])
    menv = _mtools_env()
    dirs = sorted({str(Path(name).parent) for name in files} - {"."}, key=len)
    made: set[str] = set()
    for d in dirs:
        parts = Path(d).parts
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in made:
                _run([env.host_tool("mmd"), "-i", path, f"::/{sub}"], env=menv)
                made.add(sub)
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            src = content if isinstance(content, Path) else Path(tmp) / Path(name).name
            if not isinstance(content, Path):
                src.write_bytes(content)
            _run([env.host_tool("mcopy"), "-o", "-i", path, src, f"::/{name}"], env=menv)


def bios_disk(env: GuestEnv, out: Path, kernel: Path, initrd: Path, cmdline: str,
              size: int = 64 << 20) -> Path:
    """A legacy-BIOS bootable disk image (MBR + syslinux on FAT); returns ``out``."""
    part_size = size - PART_START * SECTOR
    _sparse(out, size)
    _run([env.host_tool("sfdisk"), "-q", out], stdin=b"label: dos\nstart=2048, type=c, bootable\n")
    cfg = (f"DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /vmlinuz\n"
           f"  INITRD /initrd.img\n  APPEND {cmdline}\n").encode()
    part = out.with_name(out.name + ".part")
    try:
        _fat(env, part, part_size, "BOOT", PART_START,
             {"syslinux.cfg": cfg, "vmlinuz": kernel, "initrd.img": initrd})
        _run([env.host_tool("syslinux"), "--install", part], env=_mtools_env())
        _splice(out, part, PART_START)
    finally:
        part.unlink(missing_ok=True)
    mbr = env.file("syslinux_mbr").read_bytes()[:MBR_CODE_SIZE]
    with open(out, "r+b") as f:
        f.write(mbr)
    return out


def _pe_image_end(stub: bytes) -> int:
    """End of the last section (RVA) of a PE image (PE/COFF: DOS header e_lfanew, COFF, section table)."""
    (pe,) = struct.unpack_from("<I", stub, 0x3C)
    if stub[pe:pe + 4] != b"PE\0\0":
        raise DiskImageError("EFI stub is not a PE image")
    nsections, = struct.unpack_from("<H", stub, pe + 6)
    opt_size, = struct.unpack_from("<H", stub, pe + 20)
    table = pe + 24 + opt_size
    end = 0
    for i in range(nsections):
        vsize, vaddr = struct.unpack_from("<II", stub, table + 40 * i + 8)
        end = max(end, vaddr + vsize)
    return end


def uki(env: GuestEnv, out: Path, kernel: Path, initrd: Path, cmdline: str) -> Path:
    """A unified kernel image: the EFI stub plus .osrel, .cmdline, .initrd and .linux sections."""
    stub = env.file("efi_stub")
    align = 4096
    pos = -(-_pe_image_end(stub.read_bytes()) // align) * align
    with tempfile.TemporaryDirectory() as tmp:
        osrel = Path(tmp) / "os-release"
        osrel.write_text("ID=nvme-emu\nNAME=nvme-emu test guest\n")
        cmd = Path(tmp) / "cmdline"
        cmd.write_bytes(cmdline.encode())
        argv: list[str | os.PathLike[str]] = [env.host_tool("objcopy")]
        for name, path in ((".osrel", osrel), (".cmdline", cmd), (".initrd", initrd), (".linux", kernel)):
            argv += ["--add-section", f"{name}={path}", "--change-section-vma", f"{name}={pos:#x}"]
            pos += -(-path.stat().st_size // align) * align
        _run(argv + [stub, out])
    return out


def uefi_disk(env: GuestEnv, out: Path, kernel: Path, initrd: Path, cmdline: str,
              size: int = 64 << 20) -> Path:
    """A UEFI bootable disk image: GPT, an ESP with ``EFI/BOOT/BOOTX64.EFI`` (a UKI)."""
    _sparse(out, size)
    _run([env.host_tool("sfdisk"), "-q", out], stdin=f"label: gpt\nstart=2048, type={ESP_TYPE}\n".encode())
    part_size = size - (PART_START + GPT_BACKUP_SECTORS) * SECTOR
    part_size -= part_size % (1 << 20)
    part = out.with_name(out.name + ".part")
    efi = out.with_name(out.name + ".efi")
    try:
        uki(env, efi, kernel, initrd, cmdline)
        _fat(env, part, part_size, "ESP", PART_START, {"EFI/BOOT/BOOTX64.EFI": efi})
        _splice(out, part, PART_START)
    finally:
        part.unlink(missing_ok=True)
        efi.unlink(missing_ok=True)
    return out


def ext4_image(env: GuestEnv, out: Path, root: Path, size: int) -> Path:
    """An ext4 file system of ``size`` bytes holding the tree under ``root`` (no mount)."""
    _sparse(out, size)
    _run([env.host_tool("mke2fs"), "-q", "-F", "-t", "ext4", "-E", "nodiscard", "-d", root, out])
    return out


def tiny_initrd(env: GuestEnv, init: str, extra: Mapping[str, FileData] | None = None) -> bytes:
    """A gzip'ed cpio: static busybox, its applet links, and ``init`` as /init."""
    files: dict[str, FileData] = {"bin/busybox": env.tool("busybox")}
    files.update(extra or {})
    return run_archive(init, files)
