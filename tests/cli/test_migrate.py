"""`nvme-emu migrate`: --json report, summary line, refusals before anything changes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from emulator.nvme.migration.model import mmc_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(size: str = "16MiB", mmc_namespaces: list[int] | None = None) -> dict[str, Any]:
    return {"namespaces": [{"nsid": 1, "size": size, "lba_size": 512}],
            "controllers": [{"cntlid": 1, "type": "io", "namespaces": [1]},
                            {"cntlid": 2, "type": "mmc",
                             "namespaces": [1] if mmc_namespaces is None else mmc_namespaces}]}


def migrate(src: Any, dst: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "emulator", "migrate", str(src.config.control_path),
                           str(dst.config.control_path), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_json_report(emu: Any) -> None:
    a, b = emu(config()), emu(config())
    g = a.host(1)
    assert g.write(1, 80, b"\x5a" * 4096).ok
    p = migrate(a, b, "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["ok"] and rep["bytes_allocated"] == 4096 and rep["bytes_copied"] == 4096
    for key in ("rounds", "bytes_logged", "downtime_ms", "total_ms", "pages_reported"):
        assert key in rep
    assert g.read(1, 80, 8).data == b"\x5a" * 4096  # b serves the host now
    p = migrate(b, a)
    assert p.returncode == 0 and p.stdout.startswith("migrated: "), p.stdout + p.stderr
    assert len(p.stdout.strip().splitlines()) == 1


def test_refused_before_touching_anything(emu: Any) -> None:
    a, bigger, blind = emu(config()), emu(config(size="32MiB")), emu(config(mmc_namespaces=[]))
    a.host(1)
    p = migrate(a, bigger)
    assert p.returncode == 1 and "namespace 1 differs" in p.stdout, p.stdout
    p = migrate(a, blind)
    assert p.returncode == 1 and "attach them to the MMC" in p.stdout, p.stdout
    # the source was never suspended and runs no queue for the MMH
    assert a.call(lambda: not a.subsystem.controllers[1].state.suspended
                  and not mmc_state(a.subsystem.controllers[2]).cdqs)
