"""Guest initramfs: one cached base archive with the tools, plus a tiny per-run archive.

The Linux kernel unpacks concatenated cpio archives (each may be compressed on its own),
so a guest's initrd is ``base.cpio.gz + run.cpio.gz``:

* the base (built once per tool box, cached under ``<cache>/initramfs/``) holds static
  busybox, nvme-cli, fio, e2fsprogs and friends, every shared library they need (found
  by reading the ELF ``DT_NEEDED`` entries, no chroot needed), the loader, and the
  root's directory symlinks (``/lib -> usr/lib`` ...), so paths are as in the root;
* the per-run archive holds ``/init`` (see :func:`wrap_init`) and optional extra files.

cpio "newc" archives are written by this module (no cpio binary needed).
"""
from __future__ import annotations

import fcntl
import gzip
import io
import os
import posixpath
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Mapping, Union

from emulator.guest.env import GuestEnv

BASE_FORMAT = 3  # bump when the base layout changes

# Tools copied from the root into the base archive: required, then optional (skipped if absent).
REQUIRED_TOOLS = ["/usr/bin/busybox", "/usr/sbin/nvme", "/usr/bin/fio", "/usr/sbin/mke2fs",
                  "/usr/sbin/mkfs.ext4", "/usr/sbin/e2fsck", "/usr/sbin/dumpe2fs",
                  "/usr/sbin/debugfs"]
OPTIONAL_TOOLS = ["/usr/sbin/fsck.ext4", "/usr/sbin/tune2fs", "/usr/sbin/resize2fs",
                  "/usr/sbin/e2image", "/usr/sbin/blkdiscard", "/usr/sbin/blockdev",
                  "/usr/bin/lsblk", "/usr/sbin/sfdisk"]
EXTRA_FILES = ["/etc/mke2fs.conf"]
MERGED_USR = ["/bin", "/sbin", "/lib", "/lib64"]
EMPTY_DIRS = ["/dev", "/proc", "/sys", "/tmp", "/run", "/mnt", "/root", "/var/tmp",
              "/etc/nvme"]
DEVICE_NODES = [("/dev/console", 5, 1), ("/dev/null", 1, 3), ("/dev/ttyS0", 4, 64)]
LIB_DIRS = ["/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib", "/lib",
            "/usr/lib64", "/lib64"]

FileData = Union[bytes, str, Path]


# --------------------------------------------------------------------------- cpio (newc)

class CpioWriter:
    """Write a cpio "newc" archive (the format the kernel's initramfs unpacker reads)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1, mtime: int = 0) -> None:
        name = name.lstrip("/") or "."
        if name in self._seen:
            return
        self._seen.add(name)
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self._ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1],
            len(namez), 0))
        self._ino += 1
        self._out.write(hdr.encode() + namez)
        self._out.write(b"\0" * (-(110 + len(namez)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def add_parents(self, name: str) -> None:
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.add_dir("/".join(parts[:i]))

    def finish(self) -> None:
        self._entry("TRAILER!!!", 0, nlink=1)
        self._out.write(b"\0" * (-self._out.tell() % 512) if self._out.seekable() else b"")


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a (decompressed) newc archive: name -> (mode, data). For tests and debugging."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while pos + 110 <= len(data):
        if data[pos:pos + 6] != b"070701":
            if data[pos] == 0:
                pos += 1
                continue
            raise ValueError(f"bad cpio magic at {pos}")
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            continue
        out[name] = (mode, body)
    return out


def _gzip_bytes(raw: bytes, level: int = 1) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=level, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue()


# --------------------------------------------------------------------------- ELF

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 1, 5, 15, 29


@dataclass
class ElfDeps:
    interp: str | None = None
    needed: list[str] = field(default_factory=list)
    runpath: list[str] = field(default_factory=list)


def elf_deps(path: Path) -> ElfDeps | None:
    """Interpreter, DT_NEEDED and RUNPATH of a 64-bit little-endian ELF; None if not ELF."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dyn: tuple[int, int] | None = None
    deps = ElfDeps()
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_DYNAMIC:
            dyn = (p_offset, p_filesz)
        elif p_type == PT_INTERP:
            deps.interp = data[p_offset:p_offset + p_filesz].split(b"\0")[0].decode()
    if dyn is None:
        return deps
    entries: list[tuple[int, int]] = []
    for off in range(dyn[0], dyn[0] + dyn[1], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        entries.append((tag, val))
    strtab_vaddr = next((v for t, v in entries if t == DT_STRTAB), None)
    if strtab_vaddr is None:
        return deps
    strtab = next((off + strtab_vaddr - va for va, off, sz in loads if va <= strtab_vaddr < va + sz), None)
    if strtab is None:
        return deps

    def s(idx: int) -> str:
        end = data.index(b"\0", strtab + idx)
        return data[strtab + idx:end].decode()

    for tag, val in entries:
        if tag == DT_NEEDED:
            deps.needed.append(s(val))
        elif tag in (DT_RPATH, DT_RUNPATH):
            deps.runpath += [p for p in s(val).split(":") if p]
    return deps


# --------------------------------------------------------------------------- root tree walk

class RootTree:
    """Collects paths from a root file system, reproducing the symlinks on the way."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries: dict[str, tuple[str, str]] = {}  # in-root path -> (kind, symlink target)

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def add(self, path: str, _depth: int = 0) -> str:
        """Add an in-root absolute path (and its parents/symlinks); return its real path."""
        if _depth > 40:
            raise RuntimeError(f"symlink loop at {path}")
        parts = [p for p in posixpath.normpath(path).split("/") if p]
        cur = ""
        for i, comp in enumerate(parts):
            cand = f"{cur}/{comp}"
            host = self.host(cand)
            if host.is_symlink():
                target = os.readlink(host)
                self.entries[cand] = ("symlink", target)
                base = target if target.startswith("/") else posixpath.join(cur or "/", target)
                rest = "/".join(parts[i + 1:])
                return self.add(posixpath.normpath(base + ("/" + rest if rest else "")), _depth + 1)
            if not host.exists():
                raise FileNotFoundError(f"{cand} not in {self.root}")
            self.entries[cand] = ("dir" if host.is_dir() else "file", "")
            cur = cand
        return cur or "/"

    def find_lib(self, name: str, runpath: list[str], origin: str) -> str | None:
        for d in [p.replace("$ORIGIN", origin) for p in runpath] + LIB_DIRS:
            cand = posixpath.join(d, name)
            if self.host(cand).exists():
                return cand
        return None

    def add_elf_closure(self, path: str) -> None:
        """Add an executable and every library it (transitively) needs."""
        todo = [path]
        done: set[str] = set()
        while todo:
            p = self.add(todo.pop())
            if p in done:
                continue
            done.add(p)
            deps = elf_deps(self.host(p))
            if deps is None:
                continue
            if deps.interp:
                todo.append(deps.interp)
            for lib in deps.needed:
                found = self.find_lib(lib, deps.runpath, posixpath.dirname(p))
                if found is None:
                    raise FileNotFoundError(f"{lib} (needed by {p}) not found in {self.root}")
                todo.append(found)

    def write(self, cpio: CpioWriter) -> None:
        for name in sorted(self.entries):
            kind, target = self.entries[name]
            cpio.add_parents(name)
            if kind == "dir":
                cpio.add_dir(name)
            elif kind == "symlink":
                cpio.add_symlink(name, target)
            else:
                host = self.host(name)
                cpio.add_file(name, host.read_bytes(), stat.S_IMODE(host.stat().st_mode))


# --------------------------------------------------------------------------- base archive

def base_key(env: GuestEnv) -> str:
    import hashlib
    h = hashlib.sha256(repr((BASE_FORMAT, env.recipe_hash, str(env.root), REQUIRED_TOOLS,
                             OPTIONAL_TOOLS, EXTRA_FILES)).encode())
    return h.hexdigest()[:16]


def build_base(env: GuestEnv, out: Path) -> None:
    """Build the base archive (tools + libraries + loader) into ``out``."""
    tree = RootTree(env.root)
    for top in MERGED_USR:   # /bin -> usr/bin etc., so "#!/bin/busybox" and PATH work
        if tree.host(top).exists():
            tree.add(top)
    for tool in REQUIRED_TOOLS:
        tree.add_elf_closure(tool)
    for tool in OPTIONAL_TOOLS:
        if tree.host(tool).exists() or tree.host(tool).is_symlink():
            tree.add_elf_closure(tool)
    for extra in EXTRA_FILES:
        if tree.host(extra).exists():
            tree.add(extra)
    raw = io.BytesIO()
    cpio = CpioWriter(raw)
    for d in EMPTY_DIRS:
        cpio.add_parents(d)
        cpio.add_dir(d, 0o1777 if d in ("/tmp", "/var/tmp") else 0o755)
    for name, major, minor in DEVICE_NODES:
        cpio.add_chardev(name, major, minor)
    tree.write(cpio)
    cpio.finish()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_bytes(_gzip_bytes(raw.getvalue()))
    os.replace(tmp, out)


def base_initramfs(env: GuestEnv) -> Path:
    """Path of the cached base archive, building it (once, under a lock) if needed."""
    d = env.cache_dir / "initramfs"
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"base-{base_key(env)}.cpio.gz"
    if out.exists():
        return out
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            for old in d.glob("base-*.cpio.gz"):
                old.unlink(missing_ok=True)
            build_base(env, out)
    return out


# --------------------------------------------------------------------------- /init

INIT_PRELUDE = r"""#!/bin/busybox sh
# nvme-emu guest /init. Marker lines on the console (one per line, start of line):
#   @@RESULT name=value   @@PASS name   @@FAIL name reason   @@BEGIN name ... @@END name rc=N   @@DONE
# End whatever line the firmware left open: SeaBIOS's "Booting from ROM...<CR><LF>" sometimes
# reaches the console without its tail, and the first marker would then not start a line.
/bin/busybox echo
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
result() { echo "@@RESULT $1=$2"; }
pass() { echo "@@PASS $1"; }
fail() { _n=$1; shift; echo "@@FAIL $_n ${*:-failed}"; }
# check NAME CMD...: run CMD, print its output, then PASS or FAIL NAME
check() {
    _n=$1; shift
    "$@" 2>&1; _rc=$?
    if [ $_rc -eq 0 ]; then pass "$_n"; else fail "$_n" "exit $_rc: $*"; fi
    return $_rc
}
# capture NAME CMD...: print CMD's output between @@BEGIN NAME and @@END NAME rc=N
capture() {
    _n=$1; shift
    echo "@@BEGIN $_n"; "$@" 2>&1; _rc=$?; echo "@@END $_n rc=$_rc"
    return $_rc
}
# wait_dev PATH [SECONDS]: wait for a device node to appear
wait_dev() {
    _i=0; _t=$(( ${2:-30} * 10 ))
    while [ ! -e "$1" ]; do
        [ $_i -ge $_t ] && { echo "wait_dev: $1 did not appear"; return 1; }
        sleep 0.1; _i=$((_i + 1))
    done
}
finish() { trap - EXIT; sync; echo "@@DONE"; poweroff -f; sleep 10; }
trap finish EXIT
result init_uptime_s "$(cut -d' ' -f1 /proc/uptime)"
# ---- scenario body ----
"""

INIT_EPILOGUE = r"""
# ---- end of body ----
finish
"""


def wrap_init(body: str) -> str:
    """Turn a shell body into a complete /init (mounts, helpers, @@DONE and poweroff)."""
    return INIT_PRELUDE + body.rstrip("\n") + "\n" + INIT_EPILOGUE


def run_archive(init_script: str, extra_files: Mapping[str, FileData] | None = None) -> bytes:
    """A small gzip'ed cpio with /init (as given, not wrapped) and extra files."""
    raw = io.BytesIO()
    cpio = CpioWriter(raw)
    cpio.add_file("init", init_script.encode(), 0o755)
    for name, data in (extra_files or {}).items():
        if isinstance(data, Path):
            perm = stat.S_IMODE(data.stat().st_mode)
            content = data.read_bytes()
        else:
            perm = 0o755 if name.endswith(".sh") else 0o644
            content = data.encode() if isinstance(data, str) else data
        cpio.add_parents(name)
        cpio.add_file(name, content, perm)
    cpio.finish()
    return _gzip_bytes(raw.getvalue(), level=6)


def build_initramfs(env: GuestEnv, init_script: str, out: Path,
                    extra_files: Mapping[str, FileData] | None = None,
                    base: Path | None = None) -> Path:
    """Write ``base + run`` archives to ``out``; ``init_script`` is the full /init text
    (use :func:`wrap_init` to build one from a body).  ``base`` replaces the tool box's
    base archive (a user's initramfs; it must hold ``/bin/busybox`` for a wrapped /init)."""
    base = base or base_initramfs(env)
    small = run_archive(init_script, extra_files)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        with open(base, "rb") as b:
            while chunk := b.read(1 << 20):
                f.write(chunk)
        f.write(b"\0" * (-f.tell() % 4))
        f.write(small)
    return out


if __name__ == "__main__":  # build the base and report its size and build time
    t0 = time.monotonic()
    e = GuestEnv.load()
    p = base_initramfs(e)
    print(f"{p} {p.stat().st_size / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s")
