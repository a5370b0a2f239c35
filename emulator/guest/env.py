"""The guest tool box provisioned by scripts/guest-env, as described by its manifest.

scripts/guest-env writes ``$NVME_EMU_CACHE/guest-env.json`` (default cache:
``~/.cache/nvme-emu``).  This module only reads it; it never builds anything.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "guest-env.json"


class GuestEnvMissing(RuntimeError):
    """The guest tool box is not provisioned (or is incomplete)."""


def cache_dir() -> Path:
    """The nvme-emu cache directory (``$NVME_EMU_CACHE`` or ``~/.cache/nvme-emu``)."""
    env = os.environ.get("NVME_EMU_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "nvme-emu"


@dataclass(frozen=True)
class GuestEnv:
    """Paths of the provisioned guest tool box."""

    cache_dir: Path
    root: Path                      # the trixie root file system (guest tools, maybe QEMU)
    qemu_argv: list[str]            # argv prefix that runs qemu-system-x86_64 on this host
    qemu_img_argv: list[str]        # argv prefix that runs qemu-img (may be empty)
    qemu_env: dict[str, str]        # extra environment for QEMU (QEMU_MODULE_DIR)
    qemu_data_dirs: list[Path]      # the -L directories (firmware, option ROMs)
    kernel: Path                    # guest bzImage (NVMe, ext4, serial console built in)
    loader: Path                    # the root's dynamic loader
    library_dirs: list[Path]        # the root's library directories
    tools: dict[str, Path]          # tool name -> path inside the root (as a host path)
    versions: dict[str, str] = field(default_factory=dict)
    recipe_hash: str = ""
    # host programs (installed on the host by scripts/guest-env) that build boot disks
    host_tools: dict[str, Path] = field(default_factory=dict)
    # host files: OVMF code/vars, syslinux's MBR, systemd's EFI stub
    files: dict[str, Path] = field(default_factory=dict)
    qemu_source: str = "root"       # "root" (trixie-backports QEMU) or "system"

    @classmethod
    def load(cls, path: Path | None = None) -> "GuestEnv":
        """Read the manifest; raise GuestEnvMissing when it is absent or stale."""
        manifest = path or cache_dir() / MANIFEST_NAME
        if not manifest.is_file():
            raise GuestEnvMissing(
                f"guest tool box not provisioned ({manifest} missing): run scripts/guest-env")
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise GuestEnvMissing(f"unreadable manifest {manifest} ({e}): run scripts/guest-env") from e
        try:
            env = cls(
                cache_dir=Path(m["cache_dir"]),
                root=Path(m["root"]),
                qemu_argv=list(m["qemu_argv"]),
                qemu_img_argv=list(m.get("qemu_img_argv", [])),
                qemu_env=dict(m.get("qemu_env", {})),
                qemu_data_dirs=[Path(p) for p in m.get("qemu_data_dirs", [])],
                kernel=Path(m["kernel"]),
                loader=Path(m["loader"]),
                library_dirs=[Path(p) for p in m.get("library_dirs", [])],
                tools={k: Path(v) for k, v in m.get("tools", {}).items()},
                versions=dict(m.get("versions", {})),
                recipe_hash=str(m.get("recipe_hash", "")),
                qemu_source=str(m.get("qemu_source", "root")),
                host_tools={k: Path(v) for k, v in m.get("host_tools", {}).items()},
                files={k: Path(v) for k, v in m.get("files", {}).items()},
            )
        except (KeyError, TypeError) as e:
            raise GuestEnvMissing(f"manifest {manifest} lacks {e}: run scripts/guest-env") from e
        missing = [str(p) for p in (env.kernel, Path(env.qemu_argv[0]) if env.qemu_argv else env.root,
                                    env.tools.get("busybox", env.root / "usr/bin/busybox"))
                   if not p.exists()]
        if missing:
            raise GuestEnvMissing(f"guest tool box incomplete (missing {', '.join(missing)}): "
                                  "run scripts/guest-env")
        return env

    def tool(self, name: str) -> Path:
        """Host path of a guest tool from the root (e.g. ``nvme``, ``fio``)."""
        try:
            return self.tools[name]
        except KeyError:
            raise GuestEnvMissing(f"tool {name!r} not in the guest tool box: run scripts/guest-env") from None

    def host_tool(self, name: str) -> Path:
        """Host path of a disk-image tool (``sfdisk``, ``mkfs.fat``, ``mcopy``, ``syslinux``, ...)."""
        p = self.host_tools.get(name)
        if p is None or not p.exists():
            raise GuestEnvMissing(f"host tool {name!r} not in the guest tool box: run scripts/guest-env")
        return p

    def file(self, name: str) -> Path:
        """Host path of a firmware or boot file (``ovmf_code``, ``ovmf_vars``, ``syslinux_mbr``, ``efi_stub``)."""
        p = self.files.get(name)
        if p is None or not p.exists():
            raise GuestEnvMissing(f"file {name!r} not in the guest tool box: run scripts/guest-env")
        return p

    def qemu_data_args(self) -> list[str]:
        """``-L DIR`` arguments for the QEMU of this tool box."""
        out: list[str] = []
        for d in self.qemu_data_dirs:
            out += ["-L", str(d)]
        return out

    def qemu_environ(self) -> dict[str, str]:
        """Environment to start QEMU with (the current one plus ``qemu_env``)."""
        env = dict(os.environ)
        env.update(self.qemu_env)
        return env
