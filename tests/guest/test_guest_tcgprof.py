"""QEMU's TCG plugin of ``bench --insn`` (emulator/guest/tcgprof.c) in a real guest: it
loads into QEMU 11, counts the guest's instructions per result marker, user and kernel,
with the vCPU's CPU time, and the guest's kallsyms written to a disk name the kernel
functions it counted."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from emulator.guest import tcgprof
from emulator.guest.env import GuestEnv
from emulator.guest.qemu import Guest, GuestSpec, QemuNvme

pytestmark = pytest.mark.guest

BODY = f"""
wait_dev /dev/nvme0n1 30 && pass disk || fail disk "no /dev/nvme0n1"
result go 1
i=0; while [ $i -lt 20000 ]; do i=$((i + 1)); done
result loop 1
dd if=/dev/zero of=/dev/null bs=1M count=200 2>/dev/null
result zero 1
cat /proc/kallsyms | grep ' [tTwW] ' > /tmp/kallsyms
dd if=/tmp/kallsyms of=/dev/nvme0n1 bs=1M seek={tcgprof.KALLSYMS_OFFSET >> 20} oflag=direct conv=sync 2>/dev/null
result kallsyms $(wc -l < /tmp/kallsyms)
"""


def test_plugin_counts_instructions_per_marker_and_names_kernel_functions(
        guest_env: GuestEnv, guest_workdir: Path) -> None:
    if not (shutil.which("cc") or shutil.which("gcc")):
        msg = "bench --insn builds its QEMU plugin with a C compiler: apt-get install gcc"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and no C compiler (guest tests never skip in CI): {msg}")
        pytest.skip(msg)
    so = tcgprof.build(guest_workdir)
    sock = guest_workdir / "tcgprof.sock"
    disk = guest_workdir / "disk.img"
    spec = GuestSpec(init=BODY, qemu_nvme=[QemuNvme(disk, size=192 << 20)],
                     extra_args=tcgprof.qemu_args(so, sock))
    with Guest(guest_env, spec, guest_workdir / "guest") as g:
        g.start()
        client = tcgprof.Client(sock)
        sampler = tcgprof.Sampler(g.result.results, client, period=0.01).start()
        try:
            res = g.wait(timeout=300)
        finally:
            sampler.stop()
            client.close()
    assert res.ok and "disk" in res.passed, res.summary()
    blocks = client.blocks

    def insns(key: str) -> tuple[float, float]:
        idx, cnt = sampler.delta[key]
        n = cnt.astype(float) * blocks.ninsn[idx]
        kern = blocks.vaddr[idx] >= tcgprof.KERNEL_BASE
        return float(n[~kern].sum()), float(n[kern].sum())

    user, kernel = insns("loop")
    # busybox sh's loop: millions of user instructions, little kernel work besides ticks
    assert user > 10e6 and kernel < user, (user, kernel)
    assert 0 < sampler.cpu_ns["loop"] <= sampler.wall["loop"] * 1.2e9

    syms = tcgprof.Symbols(tcgprof.read_kallsyms(disk))
    assert len(syms.names) > 10000 and int(res.results["kallsyms"]) == len(syms.names)
    costs = tcgprof.fold(sampler, syms, {})
    # fold() keeps only fio-style keys: count the dd window by hand
    idx, cnt = sampler.delta["zero"]
    names = syms.name_of(blocks.vaddr[idx])
    by_name: dict[str, float] = {}
    for name, c, j in zip(names, cnt.tolist(), idx.tolist()):
        by_name[name] = by_name.get(name, 0.0) + c * int(blocks.ninsn[j])
    kernel_top = sorted((v, n) for n, v in by_name.items() if n != "[user]")[-5:]
    # dd from /dev/zero: the kernel clears dd's buffer, 200 MiB of it
    assert any("zero" in n or "clear" in n for _v, n in kernel_top), kernel_top
    assert costs == {}
