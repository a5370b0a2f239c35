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

from emulator.host.driver import NvmeHost
from emulator.host.memory import HostMemory
from emulator.host.transport import VfioUserTransport
from emulator.mmh.endpoint import Endpoint
from emulator.mmh.engine import Engine, Options, Report
from emulator.vfio_user.client import VfioUserClient
from lm_helpers import sparse_diff

pytestmark = pytest.mark.guest

NS_MIB = 32
SENTINEL_LBA = NS_MIB * 2048 - 1
STOP = b"STOPFIO1"


def config() -> dict[str, Any]:
    return {
        "namespaces": [{"nsid": 1, "file": "ns1.img", "size": f"{NS_MIB}MiB", "lba_size": 512}],
        "controllers": [{"cntlid": 1, "socket": "ctrl1.sock", "type": "io", "namespaces": [1],
                         "max_io_queues": 4},
                        {"cntlid": 2, "socket": "mmc.sock", "type": "mmc", "namespaces": [1]}],
    }


BODY = rf"""
wait_dev /dev/nvme0n1 60 && pass nvme_bound || fail nvme_bound "no /dev/nvme0n1"
NS=/dev/nvme0n1
writes() {{ awk '$3 == "nvme0n1" {{ print $8 }}' /proc/diskstats; }}   # writes completed
runs=0; failures=0
while ! dd if=$NS bs=512 skip={SENTINEL_LBA} count=1 iflag=direct 2>/dev/null | grep -q {STOP.decode()}; do
    runs=$((runs + 1))
    w0=$(writes)
    fio --name=lm --filename=$NS --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 \
        --size=8m --offset=$(( (runs % 3) * 8 ))m --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --output-format=terse > /tmp/fio.out 2>&1 &
    i=0; while [ "$(writes)" -lt $((w0 + 64)) ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
    pass writing_$runs
    wait $!
    rc=$?
    if [ $rc -ne 0 ]; then failures=$((failures + 1)); capture fio_failure_$runs cat /tmp/fio.out; fi
    [ $runs -ge 200 ] && break
done
result fio_runs $runs
result fio_failures $failures
capture dmesg_bad sh -c "dmesg | grep -iE 'nvme.*(timeout|reset|abort|error)|I/O error|blk_update_request' ; true"
result md5 "$(dd if=$NS bs=1M count={NS_MIB} 2>/dev/null | md5sum | cut -d' ' -f1)"
"""


def ns_file(proc: Any) -> Path:
    return proc.cwd / proc.name / "ns1.img"


def write_stop_sentinel(mmc_socket: Path) -> None:
    """Through the MMC of the instance now serving the guest (it has namespace 1 attached)."""
    mem = HostMemory(4 << 20, name="sentinel")
    h = NvmeHost(VfioUserTransport(VfioUserClient(str(mmc_socket)), mem), mem)
    try:
        h.init(io_queues=1)
        c = h.write(1, SENTINEL_LBA, STOP.ljust(512, b"\0"))
        assert c.ok, c
        assert h.flush(1).ok
    finally:
        h.close()
        mem.close()


def test_guest_disk_moves_a_b_a_b_under_fio(boot_guest, emulator, guest_workdir: Path) -> None:  # type: ignore[no-untyped-def]
    a = emulator(config(), name="a")
    b = emulator(config(), name="b")
    g = boot_guest(BODY, vfio_user=[a.sockets[0]], wait=False, name="guest")
    reports: list[Report] = []
    size = NS_MIB << 20
    for run, (src, dst) in enumerate(((a, b), (b, a), (a, b)), start=1):
        g.wait_for("PASS", f"writing_{run}", timeout=300)  # a new fio run is writing
        diffs: list[list[int]] = []

        def compare(_: Engine, src: Any = src, dst: Any = dst) -> None:
            diffs.append(sparse_diff(ns_file(src), ns_file(dst), size))
        engine = Engine(Endpoint("source", str(src.cwd / src.name / "control.sock"), 1),
                        Endpoint("destination", str(dst.cwd / dst.name / "control.sock"), 1),
                        Options(), before_switch=compare)
        r = engine.run()
        print(f"{src.name}->{dst.name}: {r.summary()}")
        assert r.ok, r.error
        assert diffs == [[]], f"{src.name}->{dst.name}: backing files differ at {diffs}"
        reports.append(r)
    write_stop_sentinel(b.sockets[1])
    res = g.wait(timeout=600, check=False)
    print(res.summary(), res.results)
    assert res.done and not res.failed, res.summary()
    assert int(res.results["fio_runs"]) >= 1
    assert res.results["fio_failures"] == "0", {k: v for k, v in res.outputs.items() if k.startswith("fio_failure")}
    assert res.outputs["dmesg_bad"].strip() == "", res.outputs["dmesg_bad"]
    b.stop()
    a.stop()
    host_md5 = hashlib.md5(ns_file(b).read_bytes().ljust(size, b"\0")).hexdigest()
    assert res.results["md5"] == host_md5
    for r in reports:
        assert r.bytes_copied <= 1.05 * (r.bytes_allocated + r.bytes_logged), r
        assert r.pages_reported > 0, r  # the source wrote into guest memory while tracked
    assert sum(r.bytes_logged for r in reports) > 0  # fio wrote during the migrations
