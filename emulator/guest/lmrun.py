"""A running guest whose disk live-migrates between emulator processes.

Shared by the guest test, ``nvme-emu scenario`` (scenarios with ``migrate:``)
and ``scripts/bench-migration``:

* :func:`fio_loop_body` -- the guest's /init body: fio 4 KiB randwrite with
  verify, one run after the other, until the last LBA holds a stop sentinel.
  Before each run is half-way through its writes it prints ``@@PASS
  writing_<n>``; each run's JSON report is captured as ``fio_<n>``.  Then
  dmesg lines about nvme timeouts, resets, aborts and I/O errors
  (``dmesg_bad``) and the md5 of the whole namespace (``md5``).
* :func:`write_stop_sentinel` -- the host writes the sentinel through an MMC
  that has the namespace attached.
* :func:`migrate` -- one migration with the MMH engine between two control sockets.
* :func:`fio_max_latency_ms` -- the longest I/O of a fio JSON report.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from emulator.host.driver import NvmeHost
from emulator.host.memory import HostMemory
from emulator.host.transport import VfioUserTransport
from emulator.mmh.endpoint import Endpoint
from emulator.mmh.engine import Engine, Options, Report

STOP = b"STOPFIO1"


def sentinel_lba(ns_bytes: int, lba_size: int = 512) -> int:
    return ns_bytes // lba_size - 1


def fio_loop_body(ns_mib: int, run_mib: int = 8, areas: int = 3, jobs: int = 1, iodepth: int = 16,
                  max_runs: int = 200, lba_size: int = 512) -> str:
    """See the module docstring; fio writes ``run_mib`` MiB per run (``jobs`` disjoint slices),
    cycling over ``areas`` areas."""
    lba = sentinel_lba(ns_mib << 20, lba_size)
    return rf"""
wait_dev /dev/nvme0n1 60 && pass nvme_bound || fail nvme_bound "no /dev/nvme0n1"
NS=/dev/nvme0n1
writes() {{ awk '$3 == "nvme0n1" {{ print $8 }}' /proc/diskstats; }}   # writes completed
result io_queues "$(ls -d /sys/class/nvme/nvme0/nvme*n1/mq/[0-9]* | wc -l)"
runs=0; failures=0
while ! dd if=$NS bs={lba_size} skip={lba} count=1 iflag=direct 2>/dev/null | grep -q {STOP.decode()}; do
    runs=$((runs + 1))
    w0=$(writes)
    fio --name=lm --filename=$NS --rw=randwrite --bs=4k --iodepth={iodepth} --numjobs={jobs} \
        --ioengine=libaio --direct=1 --size={run_mib // jobs}m --offset=$(( (runs % {areas}) * {run_mib} ))m \
        --offset_increment={run_mib // jobs}m --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --group_reporting --output-format=json > /tmp/fio.out 2>&1 &
    i=0; while [ "$(writes)" -lt $((w0 + 64)) ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
    pass writing_$runs
    wait $!
    rc=$?
    [ $rc -ne 0 ] && failures=$((failures + 1))
    capture fio_$runs cat /tmp/fio.out
    [ $runs -ge {max_runs} ] && break
done
result fio_runs $runs
result fio_failures $failures
capture dmesg_bad sh -c "dmesg | grep -iE 'nvme.*(timeout|reset|abort|error)|I/O error|blk_update_request' ; true"
result md5 "$(dd if=$NS bs=1M count={ns_mib} 2>/dev/null | md5sum | cut -d' ' -f1)"
"""


def write_stop_sentinel(mmc_socket: Path | str, ns_bytes: int, lba_size: int = 512) -> None:
    """Write the stop sentinel into the last LBA of namespace 1 through an MMC."""
    from emulator.vfio_user.client import VfioUserClient
    mem = HostMemory(4 << 20, name="nvme-emu-sentinel")
    h = NvmeHost(VfioUserTransport(VfioUserClient(str(mmc_socket)), mem), mem)
    try:
        h.init(io_queues=1)
        c = h.write(1, sentinel_lba(ns_bytes, lba_size), STOP.ljust(lba_size, b"\0"), lba_size=lba_size)
        if not c.ok or not h.flush(1).ok:
            raise RuntimeError(f"writing the stop sentinel failed: {c!r}")
    finally:
        h.close()
        mem.close()


def migrate(src_control: Path | str, dst_control: Path | str, options: Options | None = None,
            cntlid: int = 1, before_switch: Callable[[Engine], None] | None = None) -> Report:
    engine = Engine(Endpoint("source", str(src_control), cntlid),
                    Endpoint("destination", str(dst_control), cntlid), options, before_switch=before_switch)
    return engine.run()


def fio_report(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else None
    except ValueError:
        return None


def fio_max_latency_ms(text: str) -> float | None:
    """Longest write completion latency (ms) of a fio JSON report."""
    rep = fio_report(text)
    if rep is None:
        return None
    return max(job["write"]["clat_ns"]["max"] for job in rep["jobs"]) / 1e6
