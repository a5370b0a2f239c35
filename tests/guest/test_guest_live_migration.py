"""A running guest's disk moves between two emulator instances, data included (issue 10).

Instances A and B are separate processes with separate backing files.  The
guest (QEMU 11.1, TCG) runs on A's controller and loops fio 4 KiB randwrite
QD16 with verify while the MMH engine migrates the disk A->B, B->A, A->B.  At
each switch (both controllers suspended) the destination's backing file
equals the source's (sparse-aware compare).  Then the host writes a stop
sentinel into the last LBA through the last destination's MMC; the guest
ends its fio loop (one fio run per migration; each migration starts while a
run writes), checks dmesg and reads the whole namespace for an md5,
which must equal a host-side read of the last instance's backing file.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from emulator.guest.lmrun import fio_loop_body, migrate, write_stop_sentinel
from emulator.mmh.engine import Engine, Report
from lm_helpers import sparse_diff

pytestmark = pytest.mark.guest

NS_MIB = 32


def config() -> dict[str, Any]:
    return {
        "namespaces": [{"nsid": 1, "file": "ns1.img", "size": f"{NS_MIB}MiB", "lba_size": 512}],
        "controllers": [{"cntlid": 1, "socket": "ctrl1.sock", "type": "io", "namespaces": [1],
                         "max_io_queues": 4},
                        {"cntlid": 2, "socket": "mmc.sock", "type": "mmc", "namespaces": [1]}],
    }


def state(proc: Any) -> Path:
    return proc.cwd / proc.name


def test_guest_disk_moves_a_b_a_b_under_fio(boot_guest, emulator, guest_workdir: Path) -> None:  # type: ignore[no-untyped-def]
    a = emulator(config(), name="a")
    b = emulator(config(), name="b")
    g = boot_guest(fio_loop_body(NS_MIB), vfio_user=[a.sockets[0]], wait=False, name="guest")
    reports: list[Report] = []
    size = NS_MIB << 20
    for run, (src, dst) in enumerate(((a, b), (b, a), (a, b)), start=1):
        g.wait_for("PASS", f"writing_{run}", timeout=300)  # a new fio run is writing
        diffs: list[list[int]] = []

        def compare(_: Engine, src: Any = src, dst: Any = dst) -> None:
            diffs.append(sparse_diff(state(src) / "ns1.img", state(dst) / "ns1.img", size))
        r = migrate(state(src) / "control.sock", state(dst) / "control.sock", before_switch=compare)
        print(f"{src.name}->{dst.name}: {r.summary()}; steps (ms) {r.downtime_steps_ms}")
        assert r.ok, r.error
        assert diffs == [[]], f"{src.name}->{dst.name}: backing files differ at {diffs}"
        reports.append(r)
    write_stop_sentinel(b.sockets[1], size)
    res = g.wait(timeout=600, check=False)
    print(res.summary(), res.results)
    assert res.done and not res.failed, res.summary()
    assert int(res.results["fio_runs"]) >= 3
    assert res.results["fio_failures"] == "0", {k: v for k, v in res.outputs.items() if k.startswith("fio_")}
    assert res.outputs["dmesg_bad"].strip() == "", res.outputs["dmesg_bad"]
    b.stop()
    a.stop()
    host_md5 = hashlib.md5((state(b) / "ns1.img").read_bytes().ljust(size, b"\0")).hexdigest()
    assert res.results["md5"] == host_md5
    for r in reports:
        assert r.bytes_copied <= 1.05 * (r.bytes_allocated + r.bytes_logged), r
        assert r.pages_reported > 0, r  # the source wrote into guest memory while tracked
    assert sum(r.bytes_logged for r in reports) > 0  # fio wrote during the migrations
