"""`bash scripts/guest-env --check`: what is there and what is missing, changing nothing."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from emulator.guest.env import GuestEnv

REPO = Path(__file__).resolve().parents[2]


def check(cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NVME_EMU_CACHE=str(cache))
    return subprocess.run(["bash", str(REPO / "scripts" / "guest-env"), "--check"], env=env,
                          capture_output=True, text=True, timeout=120)


def listing(d: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in d.iterdir()}


def test_check_of_an_empty_cache_lists_what_is_missing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    r = check(cache)
    assert r.returncode == 1, r.stdout + r.stderr
    rows = {line.split()[1]: line.split()[0] for line in r.stdout.splitlines() if line.startswith("  ")}
    for item in ("root", "kernel", "busybox", "nvme", "fio", "qemu", "manifest"):
        assert rows.get(item) == "missing", (item, r.stdout)
    assert "to provision: bash scripts/guest-env" in r.stdout
    assert not cache.exists()   # nothing created


def test_check_of_the_provisioned_tool_box_says_ready_and_changes_nothing(guest_env: GuestEnv) -> None:
    before = listing(guest_env.cache_dir)
    r = check(guest_env.cache_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("guest-env: ready")
    assert all(line.split()[0] == "ok" for line in r.stdout.splitlines() if line.startswith("  "))
    assert "qemu" in r.stdout and "kernel" in r.stdout
    assert listing(guest_env.cache_dir) == before
