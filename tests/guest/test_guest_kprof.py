"""The guest kernel's tick profile (emulator/guest/kprof.py, ``bench --kprofile``) read in
a real guest, and the multipath head Linux puts in front of a namespace only when the
controller reports CMIC bit 1 (a subsystem of two or more controllers)."""
from __future__ import annotations

import pytest

from emulator.guest import kprof
from emulator.guest.qemu import GuestSpec

pytestmark = pytest.mark.guest

ONE = {
    "subsystem": {"serial": "EMUKPROF01", "model": "nvme-emu kprof"},
    "namespaces": [{"nsid": 1, "size": "64MiB"}],
    "controllers": [{"cntlid": 1, "type": "io", "max_io_queues": 1}],
}

BODY = kprof.GUEST_SH + r"""
wait_dev /dev/nvme0n1 30 && pass nvme_bound || fail nvme_bound "no /dev/nvme0n1"
# a path disk nvme0c0n1 exists only behind a multipath head
capture paths ls /sys/class/nvme/nvme0/
kprof_reset
dd if=/dev/zero of=/dev/null bs=64k count=20000 2>/dev/null
kprof_dump emu_zero_kibs_1
"""


def test_kernel_profile_and_no_multipath_head_for_one_controller(nvme_guest, nvme_emu):
    emu = nvme_emu(ONE, name="emu")
    res = nvme_guest.boot(GuestSpec(init=BODY, append="profile=6"), vfio_user=[emu.sockets[0]],
                          timeout=300, name="kprof")
    assert res.ok and "nvme_bound" in res.passed, res.summary()
    paths = res.outputs["paths"].split()
    assert "nvme0n1" in paths and not [p for p in paths if p.startswith("nvme0c")], paths
    prof = kprof.load(res.console_log)["emu_zero_kibs"]
    functions = {f: n for f, n in prof.items() if not f.startswith("[")}
    # dd's reads of /dev/zero: the kernel's read_zero, among others; the folding found
    # real symbols (not one bogus bucket for everything)
    assert functions.get("read_zero", 0) > 0, sorted(functions.items(), key=lambda kv: -kv[1])[:10]
    assert len(functions) >= 3
    assert prof.get("[system]", 0) > 0 and "[ctxt]" in prof and "[intr]" in prof
