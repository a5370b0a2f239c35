"""`nvme-emu serve`: listening lines, socket mode, signals, config errors (issue 2)."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "emulator", "serve", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _listening(p: subprocess.Popen[str], n: int) -> list[str]:
    assert p.stdout is not None
    lines = [p.stdout.readline().strip() for _ in range(n)]
    assert all(line.startswith("listening on ") for line in lines), lines
    return [line[len("listening on "):] for line in lines]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_config_lines_mode_and_signals(sig: int) -> None:
    d = Path(tempfile.mkdtemp(prefix="ne-"))
    cfg = {"state_dir": str(d), "namespaces": [{"nsid": 1, "size": "8MiB"}],
           "controllers": [{"cntlid": 1, "socket": "a.sock"},
                           {"cntlid": 2, "socket": "b.sock", "type": "mmc"}]}
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    p = _serve(str(d / "c.yaml"))
    socks = _listening(p, 2)
    assert socks == [str(d / "a.sock"), str(d / "b.sock")]
    for s in socks:
        st = os.stat(s)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    p.send_signal(sig)
    assert p.wait(20) == 0
    assert (d / "ns1.img").stat().st_size == 8 << 20


def test_serve_embedded_default() -> None:
    d = Path(tempfile.mkdtemp(prefix="ne-"))
    p = _serve("--state-dir", str(d))
    (sock,) = _listening(p, 1)
    assert Path(sock).parent == d
    imgs = list(d.glob("*.img"))
    assert len(imgs) == 1 and imgs[0].stat().st_size == 1 << 30
    assert imgs[0].stat().st_blocks == 0 or imgs[0].stat().st_blocks < 64  # sparse
    p.terminate()
    assert p.wait(20) == 0


def test_serve_config_error_names_key_and_reason() -> None:
    d = Path(tempfile.mkdtemp(prefix="ne-"))
    (d / "c.yaml").write_text(yaml.safe_dump({
        "state_dir": str(d), "namespaces": [{"nsid": 1, "size": "1000"}],
        "controllers": [{"cntlid": 1}]}))
    p = _serve(str(d / "c.yaml"))
    out, err = p.communicate(timeout=20)
    assert p.returncode == 2
    assert "namespaces[0].size" in err and "multiple" in err


def test_serve_visible_writes_modes() -> None:
    d = Path(tempfile.mkdtemp(prefix="ne-"))
    p = _serve("--state-dir", str(d), "--visible-writes", "all")
    _listening(p, 1)
    p.terminate()
    assert p.wait(20) == 0
    bad = _serve("--state-dir", str(d), "--visible-writes", "sometimes")
    _, err = bad.communicate(timeout=20)
    assert bad.returncode == 2 and "--visible-writes" in err

