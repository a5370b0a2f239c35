"""Run the emulator (``python -m emulator serve [CONFIG.yaml]``) as a child process.

Contract with ``emulator serve``:

* once a controller listens, it prints one line ``listening on <socket path>`` to stdout
  (one line per controller);
* SIGTERM makes it flush its state and exit with status 0.

stdout and stderr are merged into one log file.  ``PYTHONUNBUFFERED=1`` is set so the
listening lines arrive at once.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import emulator
from emulator.guest.qemu import tail

LISTENING = re.compile(r"^listening on (?P<path>\S.*?)\s*$")   # the whole line, as the contract says
REPO_ROOT = Path(emulator.__file__).resolve().parents[1]


class EmulatorError(RuntimeError):
    """The emulator did not start (or stop) as the contract says; message has its log tail."""


def count_controllers(config: Path) -> int | None:
    """Number of controllers in an emulator YAML config (None if it cannot be read)."""
    try:
        import yaml
        data = yaml.safe_load(config.read_text())
        return len(data.get("controllers") or []) or None
    except Exception:  # noqa: BLE001 - any unreadable config: fall back to the caller's default
        return None


class EmulatorProcess:
    """One ``emulator serve`` process.  ``start()`` returns the listening socket paths."""

    def __init__(self, config: Path | str | None, log_path: Path | str, *, name: str = "emulator",
                 args: Sequence[str] = (), expect: int | None = None,
                 command: Sequence[str] | None = None, cwd: Path | str | None = None,
                 env: Mapping[str, str] | None = None, settle: float = 0.0) -> None:
        self.config = Path(config) if config is not None else None
        self.log_path = Path(log_path)
        self.name = name
        self.cwd = Path(cwd) if cwd is not None else (self.config.parent if self.config else Path.cwd())
        base = list(command) if command else [sys.executable, "-m", "emulator", "serve"]
        self.argv = base + ([str(self.config)] if self.config else []) + list(args)
        if expect is None and self.config is not None:
            expect = count_controllers(self.config)
        self.expect = expect or 1
        self.extra_env = dict(env or {})
        self.settle = settle   # after `expect` lines, keep collecting lines this long
        self.sockets: list[Path] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._eof = False

    # -- lifecycle
    def start(self, timeout: float = 30.0) -> list[Path]:
        """Start and wait for ``expect`` listening lines (and the sockets to exist)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.update(self.extra_env)
        log = open(self.log_path, "wb")
        log.write(f"# {' '.join(self.argv)}  (cwd {self.cwd})\n".encode())
        log.flush()
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, cwd=self.cwd, env=env,
                                      start_new_session=True)
        self._reader = threading.Thread(target=self._read, args=(log,), daemon=True, name=f"{self.name}-log")
        self._reader.start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.sockets) < self.expect and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
        if self.settle > 0 and len(self.sockets) >= self.expect:
            end = time.monotonic() + self.settle
            with self._cond:
                while not self._eof and (left := end - time.monotonic()) > 0:
                    self._cond.wait(left)
        if len(self.sockets) < self.expect or self._eof:
            if self._eof:
                try:
                    self._proc.wait(2)
                except subprocess.TimeoutExpired:
                    pass
            why = (f"exited with status {self._proc.poll()}" if self._eof
                   else f"printed {len(self.sockets)} of {self.expect} 'listening on' lines in {timeout:.0f} s")
            self.kill()
            raise EmulatorError(f"{self.name}: {' '.join(self.argv)} {why}\n"
                                f"---- emulator log {self.log_path} (tail) ----\n{self.log_tail()}")
        for s in self.sockets:
            while not s.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return list(self.sockets)

    def _read(self, log: Any) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            for raw in iter(self._proc.stdout.readline, b""):
                log.write(raw)
                log.flush()
                m = LISTENING.match(raw.decode(errors="replace"))
                if m:
                    p = Path(m.group("path"))
                    p = p if p.is_absolute() else self.cwd / p
                    with self._cond:
                        if p not in self.sockets:
                            self.sockets.append(p)
                        self._cond.notify_all()
        finally:
            log.close()
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (the emulator flushes and exits 0); SIGKILL after ``timeout``. Returns the status."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._join()
        return self._proc.returncode

    def kill(self) -> None:
        """SIGKILL the emulator's whole process group."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        self._join()

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def __enter__(self) -> "EmulatorProcess":
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
