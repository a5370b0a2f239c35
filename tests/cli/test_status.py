"""`nvme-emu status` and `nvme-emu stats` against a running emulator (started by the
project's own pytest plugin, `nvme_emu`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = {"namespaces": [{"nsid": 1, "size": "8MiB"}],
          "controllers": [{"cntlid": 1, "type": "io"}, {"cntlid": 2, "type": "mmc"}]}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emulator", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_status_and_stats_of_a_running_emulator(nvme_emu) -> None:  # type: ignore[no-untyped-def]
    emu = nvme_emu(CONFIG)
    host = emu.host(1)
    host.write(1, 0, b"\x11" * 4096)
    host.read(1, 0, 8)

    r = cli("status", str(emu.config))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("nvme-emu pid ")
    ctrl1 = next(line for line in lines if line.strip().startswith("ctrl 1 "))
    assert "enabled" in ctrl1 and "client pid" in ctrl1 and "I/O queues 1" in ctrl1
    ctrl2 = next(line for line in lines if line.strip().startswith("ctrl 2 "))
    assert "disabled" in ctrl2 and "no client" in ctrl2
    assert any("allocated 4.0 KiB" in line for line in lines)

    r = cli("status", "--socket", str(emu.control_socket), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["capacity"]["allocated"] == 4096

    r = cli("stats", str(emu.config))
    assert r.returncode == 0, r.stderr
    assert "ctrl 1: 2 I/O commands (8.0 KiB)" in r.stdout and "write" in r.stdout

    r = cli("stats", str(emu.config), "--watch", "0.2", "--count", "2", "--json", "--cntlid", "1")
    assert r.returncode == 0, r.stderr
    samples = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(samples) == 2 and [c["cntlid"] for c in samples[0]["controllers"]] == [1]
    assert samples[0]["controllers"][0]["io_per_s"] >= 0

    r = cli("stats", str(emu.config), "--watch", "0.2", "--count", "1")
    assert r.returncode == 0 and "IO/s" in r.stdout and "p99" in r.stdout


def test_rpc_calls_any_method(nvme_emu) -> None:  # type: ignore[no-untyped-def]
    emu = nvme_emu(CONFIG)
    r = cli("rpc", "--config", str(emu.config), "stats", '{"cntlid": 2}')
    assert r.returncode == 0, r.stderr
    assert [c["cntlid"] for c in json.loads(r.stdout)["controllers"]] == [2]
    r = cli("rpc", "--socket", str(emu.control_socket), "rpc.methods")
    assert r.returncode == 0 and "status" in json.loads(r.stdout)
    r = cli("rpc", "--socket", str(emu.control_socket), "no.such")
    assert r.returncode == 1 and json.loads(r.stderr)["code"] == -32601
    r = cli("rpc", "--socket", str(emu.control_socket), "stats", "[1]")
    assert r.returncode == 2 and "JSON object" in r.stderr


def test_status_without_an_emulator_says_so(tmp_path: Path) -> None:
    r = cli("status", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1
    assert "cannot query the emulator's control socket" in r.stderr
