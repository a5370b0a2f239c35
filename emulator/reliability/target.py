"""An ``emulator serve`` child on a throw-away state directory, for the fuzzers and the soak."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from emulator.guest.emuproc import EmulatorProcess

# Two controllers on one namespace each: one under attack, one that must keep serving.
DEFAULT: dict[str, Any] = {
    "namespaces": [{"nsid": 1, "size": "64MiB"}, {"nsid": 2, "size": "64MiB"}],
    "controllers": [{"cntlid": 1, "namespaces": [1], "mdts": 3}, {"cntlid": 2, "namespaces": [2]}],
}


class Target:
    """``serve`` on ``state_dir`` (a new temp dir by default); restartable, killable."""

    def __init__(self, state_dir: Path | None = None, config: dict[str, Any] | None = None,
                 command: list[str] | None = None) -> None:
        self.own_state_dir = state_dir is None
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="ne-rel-"))
        self.command = command  # instead of `python -m emulator serve` (the config path is appended)
        raw = dict(config or DEFAULT)
        raw["state_dir"] = str(self.state_dir)
        self.config_path = Path(tempfile.mkdtemp(prefix="ne-relcfg-")) / "subsystem.yaml"
        self.config_path.write_text(yaml.safe_dump(raw))
        self.log_path = self.config_path.parent / "emulator.log"
        self.proc: EmulatorProcess | None = None
        self.sockets: list[str] = []

    def start(self) -> "Target":
        self.proc = EmulatorProcess(self.config_path, self.log_path, name="fuzz-target", command=self.command)
        self.sockets = [str(s) for s in self.proc.start()]
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.running

    def fds(self) -> int:
        assert self.proc is not None and self.proc.pid is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_kib(self) -> int:
        assert self.proc is not None and self.proc.pid is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def stop(self) -> int | None:
        return self.proc.stop() if self.proc is not None else None

    def cleanup(self) -> None:
        """Stop, then remove the config directory and a state directory made here."""
        self.stop()
        shutil.rmtree(self.config_path.parent, ignore_errors=True)
        if self.own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
