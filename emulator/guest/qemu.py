"""Boot a TCG guest under QEMU with vfio-user (and optionally QEMU's own NVMe) devices.

The guest's ``/init`` prints marker lines on the serial console (see
:mod:`emulator.guest.initramfs` for the shell helpers):

====================================  ===============================================
``@@RESULT name=value``               a named value (``GuestResult.results``)
``@@PASS name``                       a check passed (``GuestResult.passed``)
``@@FAIL name reason...``             a check failed (``GuestResult.failed``)
``@@BEGIN name`` ... ``@@END name rc=N``  captured command output (``outputs``/``output_rc``)
``@@DONE``                            /init finished; the guest powers off next
====================================  ===============================================

A marker counts only at the start of a console line.  Everything QEMU and the guest
print (stdout and stderr) goes to ``<workdir>/console.log``.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

from emulator.guest.env import GuestEnv
from emulator.guest.initramfs import FileData, build_initramfs, wrap_init

DEFAULT_APPEND = "console=ttyS0 panic=-1 quiet"
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the NUL
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-~])")   # SeaBIOS clears the screen


# --------------------------------------------------------------------------- errors

def tail(path: Path | None, lines: int = 40) -> str:
    """Last ``lines`` lines of a text file ('' when it does not exist)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read()
    except OSError:
        return ""
    text = _ANSI.sub("", data.decode(errors="replace")).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(text.rstrip("\n").split("\n")[-lines:])


class LogSource(Protocol):
    """Something whose log belongs in a guest failure report (e.g. an EmulatorProcess)."""
    name: str

    def log_tail(self, lines: int = 40) -> str: ...
    def kill(self) -> None: ...


class GuestError(RuntimeError):
    """A guest run went wrong; the message carries the console and emulator log tails."""

    def __init__(self, message: str, console_tail: str = "", emulator_tails: Mapping[str, str] | None = None,
                 result: "GuestResult | None" = None) -> None:
        self.console_tail = console_tail
        self.emulator_tails = dict(emulator_tails or {})
        self.result = result
        parts = [message]
        if console_tail:
            parts.append("---- guest console (tail) ----\n" + console_tail)
        for name, text in self.emulator_tails.items():
            parts.append(f"---- emulator log {name} (tail) ----\n" + (text or "(empty)"))
        super().__init__("\n".join(parts))


class GuestTimeout(GuestError):
    """The guest did not reach a marker (or finish) in time; QEMU and emulators were killed."""


class GuestFailed(GuestError):
    """The guest finished without @@DONE, or reported @@FAIL."""


# --------------------------------------------------------------------------- devices and spec

@dataclass
class VfioUserDevice:
    """A ``vfio-user-pci`` device connecting to a vfio-user server's UNIX socket."""
    socket: Path | str
    id: str | None = None
    props: dict[str, Any] = field(default_factory=dict)   # e.g. {"x-msg-timeout": 10000}


@dataclass
class QemuNvme:
    """QEMU's built-in ``-device nvme`` on a raw image (for comparison runs)."""
    image: Path | str
    serial: str = "QEMUNVME0001"
    id: str | None = None
    props: dict[str, Any] = field(default_factory=dict)   # e.g. {"logical_block_size": 4096}
    size: int | None = None      # create a sparse image of this size if it does not exist

    def ensure_image(self) -> None:
        img = Path(self.image)
        if self.size is not None and not img.exists():
            img.parent.mkdir(parents=True, exist_ok=True)
            with open(img, "wb") as f:
                f.truncate(self.size)


@dataclass
class GuestSpec:
    """What to boot.  ``init`` is a shell body wrapped by :func:`wrap_init` unless
    ``raw_init`` is set (then it is the complete /init script)."""
    init: str
    raw_init: bool = False
    memory_mb: int = 512
    vfio_user: list[VfioUserDevice] = field(default_factory=list)
    qemu_nvme: list[QemuNvme] = field(default_factory=list)
    extra_files: dict[str, FileData] = field(default_factory=dict)
    append: str = ""
    extra_args: list[str] = field(default_factory=list)
    incoming: str | None = None          # "-incoming URI" (migration destination)
    kernel: Path | None = None           # instead of the tool box's kernel
    initramfs: Path | None = None        # instead of the tool box's base archive (/init is appended)
    kernel_boot: bool = True             # False: the firmware boots from a disk (give it bootindex)
    firmware: str = "seabios"            # "seabios" (QEMU's default BIOS) or "ovmf" (UEFI)


def _check_socket_path(p: Path | str, what: str) -> None:
    if len(os.fsencode(str(p))) > MAX_SOCKET_PATH:
        raise ValueError(f"{what} path too long for a UNIX socket ({len(str(p))} > {MAX_SOCKET_PATH}): {p}")


def device_args(spec: GuestSpec) -> list[str]:
    """``-device``/``-drive`` arguments: every device on its own pcie-root-port."""
    args: list[str] = []
    port = 0
    for i, dev in enumerate(spec.vfio_user):
        port += 1
        _check_socket_path(dev.socket, "vfio-user socket")
        args += ["-device", f"pcie-root-port,id=rp{port},chassis={port},slot={port}"]
        d: dict[str, Any] = {"driver": "vfio-user-pci", "id": dev.id or f"vfu{i}", "bus": f"rp{port}",
                             "socket": {"path": str(dev.socket), "type": "unix"}}
        d.update(dev.props)
        args += ["-device", json.dumps(d, separators=(",", ":"))]
    for i, nv in enumerate(spec.qemu_nvme):
        port += 1
        did = nv.id or f"qnvme{i}"
        args += ["-device", f"pcie-root-port,id=rp{port},chassis={port},slot={port}"]
        args += ["-drive", f"file={nv.image},if=none,id={did}-drive,format=raw"]
        props = "".join(f",{k}={v}" for k, v in nv.props.items())
        args += ["-device", f"nvme,id={did},bus=rp{port},drive={did}-drive,serial={nv.serial}{props}"]
    return args


def firmware_args(env: GuestEnv, spec: GuestSpec, workdir: Path | str) -> list[str]:
    """``-drive if=pflash`` arguments for OVMF (code read-only, a per-guest copy of the vars)."""
    if spec.firmware == "seabios":
        return []
    if spec.firmware != "ovmf":
        raise ValueError(f"unknown firmware {spec.firmware!r} (seabios or ovmf)")
    vars_copy = Path(workdir) / "ovmf-vars.fd"
    return ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={env.file('ovmf_code')}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]


def qemu_command(env: GuestEnv, spec: GuestSpec, initrd: Path | str,
                 qmp_socket: Path | str | None = None) -> list[str]:
    """The exact QEMU argv that boots ``spec`` with ``initrd`` (printable with shlex.join)."""
    mem = f"{spec.memory_mb}M"
    argv = list(env.qemu_argv) + env.qemu_data_args() + [
        "-machine", "q35,accel=tcg,memory-backend=mem0", "-cpu", "max", "-smp", "1", "-m", mem,
        "-object", f"memory-backend-memfd,id=mem0,size={mem},share=on",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "mon:stdio",
    ]
    argv += firmware_args(env, spec, Path(initrd).parent)
    if spec.kernel_boot:
        argv += ["-kernel", str(spec.kernel or env.kernel), "-initrd", str(initrd),
                 "-append", (DEFAULT_APPEND + " " + spec.append).strip()]
    if qmp_socket is not None:
        _check_socket_path(qmp_socket, "QMP socket")
        argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    argv += device_args(spec)
    if spec.incoming:
        argv += ["-incoming", spec.incoming]
    argv += spec.extra_args
    return argv


def format_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """A copy-pasteable shell command line (with environment assignments first)."""
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
    return prefix + " \\\n    ".join(_group_args(argv))


def _group_args(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-") and i > 0:
            out.append(f"{shlex.quote(a)} {shlex.quote(argv[i + 1])}")
            i += 2
        else:
            out.append(shlex.quote(a))
            i += 1
    return out


# --------------------------------------------------------------------------- results

@dataclass
class GuestResult:
    """What the guest reported through marker lines."""
    console_log: Path
    results: dict[str, str] = field(default_factory=dict)
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    output_rc: dict[str, int] = field(default_factory=dict)
    done: bool = False
    returncode: int | None = None
    boot_seconds: float | None = None    # QEMU start -> first marker (init running)
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.done and not self.failed

    def summary(self) -> str:
        s = f"done={self.done} passed={len(self.passed)} failed={len(self.failed)}"
        for name, reason in self.failed.items():
            s += f"\n  FAIL {name}: {reason}"
        return s


class _Parser:
    def __init__(self, result: GuestResult) -> None:
        self.r = result
        self.capture: tuple[str, list[str]] | None = None
        self.seen: list[tuple[str, str]] = []    # (kind, name) in order

    def line(self, line: str) -> None:
        s = line.lstrip()
        if not s.startswith("@@"):
            if self.capture is not None:
                self.capture[1].append(line)
            return
        kind, _, rest = s[2:].partition(" ")
        rest = rest.strip()
        name = rest.split(" ", 1)[0] if rest else ""
        if kind == "RESULT":
            k, _, v = rest.partition("=")
            name = k.strip()
            self.r.results[name] = v.strip()
        elif kind == "PASS":
            self.r.passed.append(name)
        elif kind == "FAIL":
            self.r.failed[name] = rest[len(name):].strip() or "failed"
        elif kind == "BEGIN":
            self.capture = (name, [])
        elif kind == "END":
            if self.capture is not None:
                self.r.outputs[self.capture[0]] = "\n".join(self.capture[1])
                rc = rest.rpartition("rc=")[2]
                self.r.output_rc[self.capture[0]] = int(rc) if rc.lstrip("-").isdigit() else -1
            self.capture = None
        elif kind == "DONE":
            self.r.done = True
        else:
            if self.capture is not None:
                self.capture[1].append(line)
            return
        self.seen.append((kind, name))


# --------------------------------------------------------------------------- running guest

class Guest:
    """A running QEMU guest (Popen).  Use as a context manager or call :meth:`kill`."""

    def __init__(self, env: GuestEnv, spec: GuestSpec, workdir: Path, *,
                 emulators: Iterable[LogSource] = (), qmp: bool = False, name: str = "guest") -> None:
        self.env = env
        self.spec = spec
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.workdir / "console.log"
        self.initrd = self.workdir / "initrd.img"
        self.qmp_socket: Path | None = self.workdir / "qmp.sock" if qmp else None
        self.emulators: list[LogSource] = list(emulators)
        self.result = GuestResult(console_log=self.console_log)
        self._parser = _Parser(self.result)
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._t0 = 0.0
        self.command: list[str] = qemu_command(env, spec, self.initrd, self.qmp_socket)

    # -- lifecycle
    def start(self) -> "Guest":
        for nv in self.spec.qemu_nvme:
            nv.ensure_image()
        if self.spec.kernel_boot:
            init = self.spec.init if self.spec.raw_init else wrap_init(self.spec.init)
            build_initramfs(self.env, init, self.initrd, self.spec.extra_files, base=self.spec.initramfs)
        if self.spec.firmware == "ovmf":
            shutil.copyfile(self.env.file("ovmf_vars"), self.workdir / "ovmf-vars.fd")
        (self.workdir / "qemu.cmd").write_text(format_command(self.command, self.env.qemu_env) + "\n")
        log = open(self.console_log, "wb")
        log.write(f"# {shlex.join(self.command)}\n".encode())
        log.flush()
        self._t0 = time.monotonic()
        self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=self.env.qemu_environ(),
                                      cwd=self.workdir, start_new_session=True)
        self._reader = threading.Thread(target=self._read, args=(log,), daemon=True,
                                        name=f"{self.name}-console")
        self._reader.start()
        return self

    def _read(self, log: Any) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        pending = b""
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if lines:
                    with self._cond:
                        for raw in lines:
                            self._line(raw)
                        self._cond.notify_all()
        finally:
            with self._cond:
                if pending:
                    self._line(pending)
                self._proc.wait()
                self.result.returncode = self._proc.returncode
                self.result.wall_seconds = time.monotonic() - self._t0
                self._cond.notify_all()
            log.close()

    def _line(self, raw: bytes) -> None:
        line = _ANSI.sub("", raw.decode(errors="replace")).rstrip("\r")
        before = len(self._parser.seen)
        self._parser.line(line)
        if len(self._parser.seen) > before and self.result.boot_seconds is None:
            self.result.boot_seconds = time.monotonic() - self._t0

    @property
    def running(self) -> bool:
        return self._proc is not None and self.result.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def kill(self) -> None:
        """Kill QEMU (not the emulators) and wait for the console reader."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # -- waiting
    def console_tail(self, lines: int = 40) -> str:
        return tail(self.console_log, lines)

    def error(self, cls: type[GuestError], message: str, lines: int = 40) -> GuestError:
        tails = {e.name: e.log_tail(lines) for e in self.emulators}
        return cls(f"{self.name}: {message}\n{self.result.summary()}\nconsole log: {self.console_log}",
                   self.console_tail(lines), tails, self.result)

    def _timeout(self, what: str, timeout: float) -> GuestError:
        self.kill()
        for e in self.emulators:
            try:
                e.kill()
            except Exception:  # noqa: BLE001 - best effort while reporting
                pass
        return self.error(GuestTimeout, f"timed out after {timeout:.0f} s waiting for {what}")

    def wait_for(self, kind: str, name: str | None = None, timeout: float = 120.0) -> GuestResult:
        """Wait until a marker ``@@KIND [name]`` was printed (e.g. ``wait_for("RESULT", "ready")``)."""
        kind = kind.lstrip("@").upper()
        what = f"@@{kind}" + (f" {name}" if name else "")
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if any(k == kind and (name is None or n == name) for k, n in self._parser.seen):
                    return self.result
                if self.result.returncode is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
        if self.result.returncode is not None:
            raise self.error(GuestFailed, f"QEMU exited (rc={self.result.returncode}) before {what}")
        raise self._timeout(what, timeout)

    def wait(self, timeout: float = 180.0, check: bool = True) -> GuestResult:
        """Wait for QEMU to exit (the guest powers off after @@DONE)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.result.returncode is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
        if self.result.returncode is None:
            raise self._timeout("the guest to power off", timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if check and not self.result.done:
            raise self.error(GuestFailed, f"guest ended without @@DONE (QEMU rc={self.result.returncode})")
        if check and self.result.failed:
            raise self.error(GuestFailed, "guest reported failures")
        return self.result

    def qmp(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        """Run one QMP command on this guest's QMP socket (needs ``qmp=True``)."""
        from emulator.guest.qmp import qmp_command
        if self.qmp_socket is None:
            raise RuntimeError("guest started without qmp=True")
        return qmp_command(self.qmp_socket, command, arguments, timeout)


def run(env: GuestEnv, spec: GuestSpec, workdir: Path, *, timeout: float = 180.0,
        emulators: Iterable[LogSource] = (), check: bool = True) -> GuestResult:
    """Boot, wait for the guest to power off, return its markers (raise on FAIL / timeout)."""
    with Guest(env, spec, workdir, emulators=emulators) as g:
        g.start()
        return g.wait(timeout=timeout, check=check)
