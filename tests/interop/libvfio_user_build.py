"""Build libvfio-user's sample server for the interop tests, at test time.

libvfio-user (BSD-3-Clause) is not part of this repository: CI has its source
tarball and a small patch to its samples beside the clone, in the peers
directory (``$NVME_EMU_PEERS``, default: ``peers`` in the ``shared``
directory next to the repository root).  The steps, run only when the cached
build is missing:

1. (CI only, as root) ``apt-get install meson ninja-build pkg-config
   libjson-c-dev libcmocka-dev`` (after ``apt-get update`` if needed) when
   meson, ninja, json-c or cmocka are missing;
2. unpack the tarball into a fresh directory under
   ``~/.cache/nvme-emu/peers/`` (keyed by the tarball's and patch's hash);
3. ``patch -p1`` with the samples patch (the sample's BAR1 becomes a power of
   two, which the library requires);
4. ``meson setup build && ninja -C build samples/server``.

Outside CI a missing prerequisite skips with the reason; under CI it fails.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("NVME_EMU_CACHE", Path.home() / ".cache" / "nvme-emu")) / "peers"
APT_PACKAGES = ["meson", "ninja-build", "pkg-config", "libjson-c-dev", "libcmocka-dev"]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"libvfio-user interop: {reason}")
    pytest.skip(f"libvfio-user interop: {reason}")


def peers_dir() -> Path:
    return Path(os.environ.get("NVME_EMU_PEERS", REPO.parent / "shared" / "peers"))


def _tools_ok() -> bool:
    if not (shutil.which("meson") and shutil.which("ninja") and shutil.which("pkg-config")):
        return False
    return subprocess.run(["pkg-config", "--exists", "json-c", "cmocka"]).returncode == 0


def sample_server() -> Path:
    """Path of the built sample server (built once per tarball + patch)."""
    peers = peers_dir()
    tarballs = sorted(peers.glob("libvfio-user-*.tar.gz"))
    patches = sorted(peers.glob("libvfio-user-samples-*.patch"))
    if not tarballs:
        _unavailable(f"no libvfio-user-*.tar.gz in {peers} (set NVME_EMU_PEERS)")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in tarballs[:1] + patches)).hexdigest()[:12]
    out = CACHE / f"libvfio-user-{digest}"
    server = out / "libvfio-user" / "build" / "samples" / "server"
    if server.exists():
        return server
    if not _tools_ok():
        if in_ci() and os.geteuid() == 0:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]
            if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode:
                subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, stdout=subprocess.DEVNULL)
                subprocess.run(install, env=env, check=True, stdout=subprocess.DEVNULL)
        if not _tools_ok():
            _unavailable("meson, ninja and json-c/cmocka headers are needed: "
                         f"apt-get install {' '.join(APT_PACKAGES)}")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="libvfio-user-", dir=CACHE))
    try:
        with tarfile.open(tarballs[0]) as tf:
            try:
                tf.extractall(work, filter="data")
            except TypeError:  # Python without extraction filters
                tf.extractall(work)
        src = work / "libvfio-user"
        for patch in patches:
            subprocess.run(["patch", "-p1", "-i", str(patch)], cwd=src, check=True, stdout=subprocess.DEVNULL)
        for cmd in (["meson", "setup", "build"], ["ninja", "-C", "build", "samples/server"]):
            r = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)  # atomic: a half-built tree is never taken for a build
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return server
