"""Backing files and config values a careless or hostile setup could get wrong."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emulator.nvme.namespace import Namespace, NamespaceConfig
from emulator.subsystem.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[2]


def ns(path: Path, size: int = 16 << 20) -> Namespace:
    return Namespace(NamespaceConfig(1, path, size))


def test_a_larger_image_configured_smaller_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "ns1.img"
    n = ns(img, 32 << 20)
    os.pwrite(n.fd, b"keep me", (32 << 20) - 4096)
    n.close()
    with pytest.raises(ValueError) as e:
        ns(img, 16 << 20)
    msg = str(e.value)
    assert str(img) in msg and str(32 << 20) in msg and str(16 << 20) in msg
    assert img.stat().st_size == 32 << 20  # not truncated
    n = ns(img, 64 << 20)  # growing is fine
    assert os.pread(n.fd, 7, (32 << 20) - 4096) == b"keep me"
    n.close()


@pytest.mark.parametrize("which", ["image", "sidecar"])
def test_symlinks_are_not_followed(tmp_path: Path, which: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    img = tmp_path / "ns1.img"
    link = img if which == "image" else Path(str(img) + ".alloc")
    link.symlink_to(victim)
    with pytest.raises(ValueError, match="symbolic link"):
        ns(img)
    assert victim.read_bytes() == b"precious"


def test_image_and_sidecar_are_private(tmp_path: Path) -> None:
    img = tmp_path / "ns1.img"
    ns(img).close()
    for f in (img, Path(str(img) + ".alloc")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_a_fifo_is_not_a_backing_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "ns1.img")
    with pytest.raises(ValueError, match="not a regular file"):
        ns(tmp_path / "ns1.img")


def config(tmp_path: Path, **ns_keys: object) -> dict:
    return {"state_dir": str(tmp_path / "state"), "namespaces": [{"nsid": 1, "size": "16MiB", **ns_keys}],
            "controllers": [{"cntlid": 1}]}


def test_dotdot_cannot_leave_the_state_dir(tmp_path: Path) -> None:
    for bad in ("../ns1.img", "a/../../ns1.img"):
        with pytest.raises(ConfigError, match=r"namespaces\[0\]\.file: .*leaves"):
            parse_config(config(tmp_path, file=bad), tmp_path)
    raw = config(tmp_path)
    raw["controllers"][0]["socket"] = "../c.sock"
    with pytest.raises(ConfigError, match=r"controllers\[0\]\.socket: .*leaves"):
        parse_config(raw, tmp_path)
    # inside is fine, and an absolute path is an explicit choice
    assert parse_config(config(tmp_path, file="a/../b.img"), tmp_path).namespaces[0].file == tmp_path / "state/b.img"
    assert parse_config(config(tmp_path, file=str(tmp_path / "x.img")), tmp_path).namespaces[0].file == \
        tmp_path / "x.img"


@pytest.mark.parametrize("size,match", [(1 << 63, "largest file size"), ((1 << 63) - 512, "granules"),
                                        ("64TiB", "granules")])
def test_namespace_size_range(tmp_path: Path, size: object, match: str) -> None:
    with pytest.raises(ConfigError, match=r"namespaces\[0\]\.size: .*" + match):
        parse_config(config(tmp_path, size=size), tmp_path)
    # a bigger TLBAAG makes a big namespace possible
    parse_config(config(tmp_path, size="64TiB", tlbaag=64), tmp_path)


def test_serve_refuses_a_shrinking_config_without_a_traceback(tmp_path: Path) -> None:
    img = tmp_path / "ns1.img"
    img.write_bytes(b"")
    os.truncate(img, 32 << 20)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config(tmp_path, file=str(img))))
    p = subprocess.run([sys.executable, "-m", "emulator", "serve", str(tmp_path / "c.yaml")], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "cannot start" in p.stderr and str(img) in p.stderr and "Traceback" not in p.stderr
    assert img.stat().st_size == 32 << 20
