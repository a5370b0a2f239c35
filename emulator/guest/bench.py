"""Side-by-side guest benchmark: QEMU's built-in NVMe vs nvme-emu over vfio-user.

One TCG guest gets both disks (same size, same host page cache situation) and
runs the same fio jobs on each, in one run:

- 4 KiB random read and random write at QD32 and at QD1, libaio, O_DIRECT
- 128 KiB sequential read and write, QD4 (a 1 MiB request would exceed our MDTS split)
- 4 KiB random 70 % read / 30 % write at QD8 (IOPS of both directions summed)

(``JOBS`` below is the one list; ``--jobs`` picks some of them.)  Each job runs on
one device and right after on the other (the order alternates from round to round),
so the two runs of a pair are seconds apart: the machine's speed drifts by up to 2x
over tens of seconds here (docs/performance.md), and a pair shares the drift.

Prints a table with the emulator/QEMU ratio, and what each job cost the emulator
process: its CPU in % of one core while it served the job, CPU µs per I/O (I/Os
estimated as rate x (runtime + the 1 s ramp)), and its CPU while the guest ran
the same job on QEMU's disk (what an idle emulator costs).  Run: ``bash scripts/bench-guest``
(or ``python -m emulator.guest.bench``).

``--count`` runs the emulator under emulator/bench/iocount.py and prints, per job, what
each I/O cost in events: vfio-user messages by kind and BAR0 target (SQ tail / CQ head
doorbells, registers, MSI-X table, config space), eventfd interrupts, ``recvmsg`` calls,
and the I/O commands the fast path served or left to the normal path, with the reason
(SGL, FUA, ...).  The wrappers cost CPU: the timing columns of a ``--count`` run are not
comparable with those of a run without it.

``--insn`` loads a TCG plugin into QEMU (emulator/guest/tcgprof.py) and prints, per job and
device, the guest's instructions per I/O by kernel area and function and the vCPU's host
ns per guest instruction: exact counts, for where a guest I/O's cost goes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from emulator.guest import benchwatch, kprof, tcgprof
from emulator.guest.emuproc import EmulatorProcess
from emulator.guest.env import GuestEnv
from emulator.guest.jobcpu import JobCpu, JobSamples
from emulator.guest.qemu import Guest, GuestError, GuestSpec, QemuNvme, VfioUserDevice
from emulator.vfio_user.dmawrite import DEFAULT_MODE, MODES

SIZE = 256 << 20
MODEL = "nvme-emu bench"

BODY = r"""
find_dev() {  # find_dev MODEL_SUBSTRING -> /dev/nvmeXn1
    for c in /sys/class/nvme/nvme*; do
        if grep -q "$1" "$c/model" 2>/dev/null; then
            for n in /dev/$(basename $c)n1; do echo $n; return; done
        fi
    done
}
i=0; while [ $i -lt 300 ]; do
    [ -n "$(find_dev 'nvme-emu')" ] && [ -n "$(find_dev 'QEMU')" ] && break
    sleep 0.1; i=$((i + 1))
done
EMU=$(find_dev 'nvme-emu'); QEMU=$(find_dev 'QEMU')
[ -n "$EMU" ] && [ -n "$QEMU" ] && pass both_disks || { fail both_disks "emu=$EMU qemu=$QEMU"; exit 0; }
dd if=/dev/urandom of=/tmp/fill bs=1M count=16 2>/dev/null
for DEV in $QEMU $EMU; do  # fill the region so both read real data, not holes
    k=0; while [ $k -lt 4 ]; do
        dd if=/tmp/fill of=$DEV bs=1M seek=$((k * 16)) oflag=direct 2>/dev/null; k=$((k + 1))
    done
done
result filled 1
cpu_busy() {  # the guest's busy and total jiffies since boot (/proc/stat, all CPUs)
    awk '/^cpu /{t=0; for(i=2;i<=NF;i++) t+=$i; print t-$5-$6, t}' /proc/stat
}
dev_irqs() {  # dev_irqs /dev/nvmeXn1: interrupts taken by that controller's vectors so far
    c=$(basename $1); c=${c%n1}
    awk -v c="$c" '$NF ~ "^"c"q[0-9]+$" {for(i=2;i<NF;i++) if ($i ~ /^[0-9]+$/) s+=$i} END {print s+0}' /proc/interrupts
}
@KPROF@
fio_job() {  # fio_job KEY "TERSE FIELDS TO SUM" FIO-ARGS...: one result per device and round
    key=$1; fields=$2; shift 2
    result ${name}_${key}_go_$r 1  # the job starts (the host cuts CPU intervals and attaches tools here)
    set -- $(cpu_busy) $(dev_irqs $DEV) "$@"; b0=$1; t0=$2; i0=$3; shift 3
    kprof_reset
    fio --name=$key --filename=$DEV --ioengine=libaio --direct=1 --size=64m --time_based \
        --runtime=@RUNTIME@ --ramp_time=1 --output-format=terse --terse-version=3 "$@" \
        > /tmp/job.out 2>&1
    set -- $(cpu_busy) $(dev_irqs $DEV); b1=$1; t1=$2; i1=$3
    v=0
    for f in $fields; do
        x=$(cut -d';' -f$f /tmp/job.out | head -n1); case "$x" in ''|*[!0-9]*) x=0;; esac
        v=$((v + x))
    done
    result ${name}_${key}_$r "$v"  # first: the host cuts CPU intervals at the job's result
    # guest CPU busy in per mille of the job's wall time, and the device's interrupts
    [ $((t1 - t0)) -gt 0 ] && result ${name}_${key}_gbusy_$r $(((b1 - b0) * 1000 / (t1 - t0)))
    result ${name}_${key}_girq_$r $((i1 - i0))
    kprof_dump ${name}_${key}_$r
}
job() {  # job KEY "FIELDS" FIO-ARGS...: the job on both devices, one right after the other
    for name in $ORDER; do
        [ $name = emu ] && DEV=$EMU || DEV=$QEMU
        fio_job "$@"
    done
}
r=0
while [ $r -lt @ROUNDS@ ]; do
  r=$((r + 1))
  # alternate the order from round to round
  [ $((r % 2)) -eq 1 ] && ORDER="qemu emu" || ORDER="emu qemu"
@JOBS@
done
@KALLSYMS@
"""


# --insn: the guest's kernel symbols, for the host to name the functions it counted, go
# to a spare area of QEMU's disk (fio uses its first 64 MiB); tcgprof.read_kallsyms reads them.
KALLSYMS_SH = f"""
cat /proc/kallsyms | grep ' [tTwW] ' > /tmp/kallsyms
dd if=/tmp/kallsyms of=$QEMU bs=1M seek={tcgprof.KALLSYMS_OFFSET >> 20} oflag=direct conv=sync 2>/dev/null
result kallsyms $(wc -l < /tmp/kallsyms)
"""


# --insn counts from this long after fio starts (its start-up and 1 s ramp) to its end.
INSN_LEAD = 2.0

# (result key, table label, fio arguments).  fio terse v3 fields (fio's HOWTO, "Terse
# output"): 7 read KiB/s, 8 read IOPS, 48 write KiB/s, 49 write IOPS; a key ending in
# _kibs reports bandwidth, _iops IOPS, summed over both directions for a mixed job.
JOBS: list[tuple[str, str, str]] = [
    ("randread_iops", "fio 4 KiB randread QD32 (IOPS)", "--rw=randread --bs=4k --iodepth=32"),
    ("randwrite_iops", "fio 4 KiB randwrite QD32 (IOPS)", "--rw=randwrite --bs=4k --iodepth=32"),
    ("randread1_iops", "fio 4 KiB randread QD1 (IOPS)", "--rw=randread --bs=4k --iodepth=1"),
    ("randwrite1_iops", "fio 4 KiB randwrite QD1 (IOPS)", "--rw=randwrite --bs=4k --iodepth=1"),
    ("seqread_kibs", "fio 128 KiB seq read QD4 (MiB/s)", "--rw=read --bs=128k --iodepth=4"),
    ("seqwrite_kibs", "fio 128 KiB seq write QD4 (MiB/s)", "--rw=write --bs=128k --iodepth=4"),
    ("mixed_iops", "fio 4 KiB randrw 70/30 QD8 (IOPS)",
     "--rw=randrw --rwmixread=70 --bs=4k --iodepth=8"),
]


def job_rate(key: str, figure: float) -> float:
    """I/Os per second of job ``key`` from its fio figure (IOPS, or KiB/s of 128 KiB I/Os
    for a ``_kibs`` job)."""
    return figure / (128 if key.endswith("_kibs") else 1)


def job_ios(key: str, figure: float, runtime: int) -> float:
    """I/Os of one fio run of job ``key`` from its figure: rate x (runtime + fio's 1 s
    ramp, which runs too)."""
    return job_rate(key, figure) * (runtime + 1)


def round_rates(results: dict[str, str]) -> dict[str, float]:
    """I/Os per second of each fio run (``device_job_ROUND``) from the guest's results;
    a figure that is not a number is skipped."""
    out: dict[str, float] = {}
    for k, v in results.items():
        head, _, rnd = k.rpartition("_")
        if rnd.isdigit() and head.endswith(("_iops", "_kibs")):
            try:
                out[k] = job_rate(head, float(v))
            except ValueError:
                continue
    return out


def ios_of(results: dict[str, str], runtime: int) -> dict[str, float]:
    """I/Os of each ``device_job`` (e.g. ``emu_seqread_kibs``) summed over its rounds, from
    the guest's results (``device_job_ROUND``); a figure that is not a number is skipped."""
    out: dict[str, float] = {}
    for k, rate in round_rates(results).items():
        head = k.rpartition("_")[0]
        out[head] = out.get(head, 0.0) + rate * (runtime + 1)
    return out


def _job_lines(keys: list[str]) -> str:
    lines = []
    for key, _label, fio_args in JOBS:
        if key in keys:
            fields = "7 48" if key.endswith("_kibs") else "8 49"
            lines.append(f'  job {key} "{fields}" {fio_args}')
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    p.add_argument("--rounds", type=int, default=3, help="rounds (order alternates); medians are reported")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the images, logs and tool outputs here (default: a scratch directory "
                        "under /tmp, removed at the end unless the guest failed or --attach ran)")
    p.add_argument("--visible-writes", choices=MODES, default=DEFAULT_MODE,
                   help="the emulator's --visible-writes mode (all: every device write as a DMA_WRITE)")
    p.add_argument("--jobs", default=",".join(k for k, _l, _a in JOBS),
                   help="comma-separated result keys of JOBS (default: all)")
    p.add_argument("--sq-poll-idle-us", type=int, default=None,
                   help="the controller's sq_poll_idle_us (polling of shadow SQ tails; 0: off); "
                        "default: the configuration's default")
    p.add_argument("--attach", default=None, metavar="COMMAND",
                   help="a shell command started when each nvme-emu job starts, formatted with {pid} "
                        "(the emulator), {qemu} (QEMU), {device} (emu or qemu), {job}, {seconds} (the job's "
                        "run time with its ramp) and {workdir}; e.g. 'py-spy record -p {pid} -d {seconds} "
                        "-r 300 -f raw --nonblocking -o {workdir}/{job}.txt'")
    p.add_argument("--attach-both", action="store_true",
                   help="start --attach at the jobs on QEMU's disk too (to profile QEMU itself for both "
                        "devices, e.g. 'perf record -p {qemu} -o {workdir}/{job}.perf -- sleep {seconds}')")
    p.add_argument("--append", default="", metavar="ARGS",
                   help="extra guest kernel command line, for diagnosis only (e.g. nvme.sgl_threshold=0: "
                        "Linux then never uses SGLs); the product is measured with a stock guest")
    p.add_argument("--pin", choices=benchwatch.PIN_LAYOUTS, default=None,
                   help="once the guest has booted, pin threads (diagnosis of placement): vcpu = "
                        "QEMU's vCPU thread (its busiest) on the first CPU, every other QEMU and "
                        "emulator thread on the others; split = all of QEMU on the first CPU, the "
                        "emulator on the others")
    p.add_argument("--kprofile", type=int, default=None, metavar="SHIFT",
                   help="boot the guest with profile=SHIFT (the kernel's tick profiler, buckets of "
                        "2^SHIFT bytes; 6 is plenty) and print, per job, the guest kernel functions whose "
                        "µs per I/O differ most between the devices (emulator/guest/kprof.py)")
    p.add_argument("--insn", action="store_true",
                   help="count the guest's instructions per I/O with a TCG plugin (built with cc) and "
                        "report them by kernel area and function, with the vCPU's ns per instruction, "
                        "for both devices (emulator/guest/tcgprof.py)")
    p.add_argument("--raw", action="store_true", help="also print each round's figures")
    p.add_argument("--count", action="store_true",
                   help="count the emulator's messages, interrupts and fast/normal path commands "
                        "per I/O of each job (emulator/bench/iocount.py; costs CPU)")


def run_bench(runtime: int, workdir: Path | None = None, rounds: int = 3,
              visible_writes: str = DEFAULT_MODE, jobs: list[str] | None = None,
              sq_poll_idle_us: int | None = None,
              counts: dict[str, dict[str, float]] | None = None,
              attach: str | None = None, append: str = "", pin: str | None = None,
              raw: dict[str, list[float]] | None = None, attach_both: bool = False,
              kprofile: int | None = None, reports: list[str] | None = None,
              insn: bool = False) -> dict[str, float]:
    """Medians over the rounds: ``{emu,qemu}_KEY`` (the fio figure) and, per device run,
    ``cpu_{emu,qemu}_KEY`` (emulator CPU seconds) and ``wall_{emu,qemu}_KEY`` (seconds).

    With ``counts`` (a dict), the emulator runs under emulator/bench/iocount.py and
    ``counts`` gets its counters' change per guest result (``{emu,qemu}_KEY_ROUND``,
    ``filled``: boot and fill).  ``attach``, ``append``, ``pin``, ``attach_both``: see
    ``--attach``, ``--append``, ``--pin``, ``--attach-both``; ``raw`` (a dict) gets each round's figures;
    with ``kprofile`` (``--kprofile``) or ``insn`` (``--insn``), ``reports`` (a list) gets the
    kernel profile's or the instruction count's report."""
    keys = jobs or [k for k, _l, _a in JOBS]
    env = GuestEnv.load()
    wd = workdir or Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    wd.mkdir(parents=True, exist_ok=True)
    cfg = {"state_dir": str(wd / "state"),
           "subsystem": {"model": MODEL, "serial": "BENCH0001"},
           "namespaces": [{"nsid": 1, "size": SIZE}],
           "controllers": [{"cntlid": 1, "type": "io", "max_io_queues": 4}]}
    if sq_poll_idle_us is not None:
        cfg["controllers"][0]["sq_poll_idle_us"] = sq_poll_idle_us
    cfg_path = wd / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    module = "emulator.bench.iocount" if counts is not None else "emulator"
    emu = EmulatorProcess(cfg_path, wd / "emu.log", name="emu", cwd=wd,
                          command=[sys.executable, "-m", module, "serve", "--visible-writes", visible_writes])
    emu.start()
    try:
        body = (BODY.replace("@JOBS@", _job_lines(keys)).replace("@KPROF@", kprof.GUEST_SH)
                .replace("@KALLSYMS@", KALLSYMS_SH if insn else ""))
        plugin_sock = wd / "tcgprof.sock"
        extra = tcgprof.qemu_args(tcgprof.build(wd), plugin_sock) if insn else []
        spec = GuestSpec(init=body.replace("@RUNTIME@", str(runtime)).replace("@ROUNDS@", str(rounds)),
                         vfio_user=[VfioUserDevice(emu.sockets[0])],
                         qemu_nvme=[QemuNvme(wd / "qemu.img", serial="QEMUBENCH", size=SIZE)],
                         append=" ".join(a for a in (append, f"profile={kprofile}" if kprofile is not None
                                                               else "") if a),
                         extra_args=extra)
        with Guest(env, spec, wd / "guest") as g:
            g.start()
            try:  # booted: the vCPU is QEMU's busiest thread
                g.wait_for("RESULT", "filled", timeout=300)
            except GuestError as e:
                raise SystemExit(f"benchmark guest failed before its jobs: {e}; {g.result.summary()} "
                                 f"(logs in {wd})")
            if pin:
                benchwatch.pin(pin, g.pid, emu.pid)
            cpu = JobCpu(g.result.results, {"emu": lambda: emu.pid}).start()
            place = None
            if g.pid is not None and emu.pid is not None:
                placer = benchwatch.Placement(g.pid, emu.pid).start()
                place = JobSamples(g.result.results, placer.sample, zero=True).start()
            counter = None
            if counts is not None:
                counter = JobSamples(g.result.results, _iocount(wd / "state" / "control.sock"), zero=True).start()
            insns = (tcgprof.Sampler(g.result.results, tcgprof.Client(plugin_sock), lead=INSN_LEAD).start()
                     if insn else None)
            hooks = None
            if attach:
                hooks = benchwatch.Attach(g.result.results, attach, {"pid": emu.pid, "qemu": g.pid}, runtime + 1, wd,
                                ("emu", "qemu") if attach_both else ("emu",)).start()
            try:
                per_job = runtime + 2 + (60 if kprofile is not None else 0)  # the profile's dump: slow
                res = g.wait(timeout=120 + 3 * len(keys) * per_job * rounds, check=False)
            finally:
                cpu.stop()
                if place is not None:
                    place.stop()
                    placer.stop()
                if hooks is not None:
                    hooks.stop()
                if counter is not None:
                    counter.stop()
                    counts.update(counter.delta)
                if insns is not None:
                    insns.stop()
                    insns.client.close()
    finally:
        emu.stop()
    if not res.ok:
        raise SystemExit(f"benchmark guest failed: {res.summary()} (logs in {wd})")
    if kprofile is not None and reports is not None:
        reports.append(kprof.report(kprof.load(g.console_log), ios_of(res.results, runtime)))
    if insns is not None and reports is not None:
        syms = tcgprof.Symbols(tcgprof.read_kallsyms(wd / "qemu.img"))
        reports.append(tcgprof.report(tcgprof.fold(insns, syms, round_rates(res.results))))
    if workdir is None and not attach:  # its own scratch directory (128 MiB images): gone
        shutil.rmtree(wd, ignore_errors=True)
    samples: dict[str, list[float]] = {}
    for k, v in res.results.items():
        key, _, rnd = k.rpartition("_")
        if key.endswith(("_gbusy", "_girq")) and rnd.isdigit() and v:
            samples.setdefault(key, []).append(float(v))  # guest-side: CPU busy ‰, interrupts
        if key.endswith(("_iops", "_kibs")) and rnd.isdigit() and v:
            samples.setdefault(key, []).append(float(v))
            d = place.delta.get(k, {}) if place is not None else {}
            if d.get("place.samples"):
                samples.setdefault(f"{key}_shared", []).append(100 * d["place.shared"] / d["place.samples"])
            if place is not None and place.wall.get(k):  # the vCPU waiting for a host CPU, %
                samples.setdefault(f"{key}_vwait", []).append(
                    d.get("place.vcpu_wait_ns", 0.0) / 1e7 / place.wall[k])
                samples.setdefault(f"{key}_vrun", []).append(  # and running, %
                    d.get("place.vcpu_run_ns", 0.0) / 1e7 / place.wall[k])
            if k in cpu.cpu and "emu" in cpu.cpu[k]:
                samples.setdefault(f"cpu_{key}", []).append(cpu.cpu[k]["emu"])
                samples.setdefault(f"wall_{key}", []).append(cpu.wall[k])
    if raw is not None:
        raw.update(samples)
    out = {k: statistics.median(v) for k, v in samples.items()}
    out.update(paired(res.results, keys))
    return out


def paired(results: dict[str, str], keys: list[str]) -> dict[str, float]:
    """Each round's ratio nvme-emu / QEMU nvme (the two runs of a round are back to back,
    so they share the machine's drift): ``pair_KEY`` their median, ``pairlo_KEY`` and
    ``pairhi_KEY`` the lowest and highest."""
    out: dict[str, float] = {}
    for key in keys:
        ratios = []
        for k, v in results.items():
            head, _, rnd = k.rpartition("_")
            if head == f"emu_{key}" and rnd.isdigit() and v:
                q = results.get(f"qemu_{key}_{rnd}")
                try:
                    if q and float(q) > 0:
                        ratios.append(float(v) / float(q))
                except ValueError:
                    continue
        if ratios:
            out[f"pair_{key}"] = statistics.median(ratios)
            out[f"pairlo_{key}"], out[f"pairhi_{key}"] = min(ratios), max(ratios)
    return out


def _iocount(control: Path) -> Callable[[], dict[str, float]]:
    """A sampler of the emulator's counters (the control method debug.iocount)."""
    from emulator.control import ControlClient

    def sample() -> dict[str, float]:
        try:
            with ControlClient(str(control)) as c:
                return c.call("debug.iocount")["counts"]
        except (OSError, ValueError, KeyError):
            return {}
    return sample


# The counters of the --count table (emulator/bench/iocount.py), per I/O: (label, counters
# summed; a name ending in "." sums every counter it starts)
COUNT_COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("msgs", ("msg.",)),
    ("SQdb", ("write.sqdb.io",)),
    ("CQdb", ("write.cqdb.io",)),
    ("regs", ("write.bar0.regs", "read.bar0.regs")),
    ("msix", ("write.bar0.msix_table", "read.bar0.msix_table", "write.bar0.pba", "read.bar0.pba")),
    ("cfg", ("write.config", "read.config")),
    ("irq", ("irq.eventfd", "cwait.irqs")),
    ("recvmsg", ("sys.recvmsg",)),
    ("wakeups", ("loop.readable",)),
    ("fast", ("io.fast",)),
    ("normal", ("io.normal",)),
    # the shadow tail poller (--sq-poll-idle-us): commands served by its turns in C, its
    # waits in C, Python turns, re-arms of the EventIdx
    ("C turns", ("io.cwait",)),
    ("waits", ("cwait.waits",)),
    ("pyturns", ("poll.turns",)),
    ("rearms", ("poll.rearms",)),
]


def report_counts(counts: dict[str, dict[str, float]]) -> str:
    """Per guest result: the I/O commands and each COUNT_COLUMNS figure per I/O, then
    why commands took the normal path and which messages were not doorbells."""
    head = f"{'result':22} {'I/Os':>7}" + "".join(f" {label:>7}" for label, _c in COUNT_COLUMNS)
    out = [head]
    notes = []
    for key, d in counts.items():
        if "_go_" in key:
            continue  # between a job's end and the next job's start
        ios = d.get("io.fast", 0) + d.get("io.normal", 0) + d.get("io.cwait", 0)  # (C turns' apart)
        if not ios and not any(d.values()):
            continue
        line = f"{key:22} {ios:7.0f}"
        for _label, names in COUNT_COLUMNS:
            v = sum(n for k, n in d.items() if any(k == c or (c[-1] == "." and k.startswith(c)) for c in names))
            line += f" {v / ios:7.3f}" if ios else f" {v:7.0f}"
        out.append(line)
        extra = {k: v for k, v in d.items() if v and k.startswith(("normal.", "msg.", "admin."))
                 and k != "msg.posted_write"}
        if extra:
            notes.append(f"{key}: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(extra.items())))
    out.append("(per I/O; I/Os = I/O commands completed; msgs = vfio-user messages received; "
               "SQdb/CQdb = I/O queue doorbell writes; irq = eventfd writes, C's turns included)")
    return "\n".join(out + notes)


def report(r: dict[str, float], runtime: int | None = None) -> str:
    """The table; with ``runtime``, the emulator's CPU columns too: % of a core during the
    nvme-emu job, µs per I/O of it, % of a core during the QEMU job (the emulator idle)."""
    head = f"{'job':36} {'QEMU nvme':>12} {'nvme-emu':>12} {'ratio':>7} {'paired':>7} {'range':>11}"
    if runtime is not None:
        head += f" {'emu CPU %':>9} {'µs/IO':>7} {'idle %':>7}"
    out = [head]
    for key, label, _args in JOBS:
        if f"qemu_{key}" not in r and f"emu_{key}" not in r:
            continue
        q, e = r.get(f"qemu_{key}", 0.0), r.get(f"emu_{key}", 0.0)
        ios = job_ios(key, e, runtime) if runtime is not None else 0.0
        if key.endswith("kibs"):
            q, e = q / 1024, e / 1024
        ratio = e / q if q else float("nan")
        line = f"{label:36} {q:12.1f} {e:12.1f} {ratio:7.2f}"
        nan = float("nan")
        line += (f" {r.get(f'pair_{key}', nan):7.2f}"
                 f" {r.get(f'pairlo_{key}', nan):5.2f}-{r.get(f'pairhi_{key}', nan):<5.2f}")
        if runtime is not None:
            def pct(name: str) -> float:
                wall = r.get(f"wall_{name}_{key}", 0.0)
                return 100 * r.get(f"cpu_{name}_{key}", 0.0) / wall if wall else float("nan")
            us = 1e6 * r.get(f"cpu_emu_{key}", 0.0) / ios if ios else float("nan")
            line += f" {pct('emu'):9.0f} {us:7.0f} {pct('qemu'):7.1f}"
        out.append(line)
    if runtime is not None and any(k.endswith("_gbusy") for k in r):
        out.append(report_guest(r, runtime))
    return "\n".join(out)


def report_guest(r: dict[str, float], runtime: int) -> str:
    """The guest's side of each job, per device: its vCPU busy in % of the job's wall time
    (/proc/stat) and the device's interrupts per I/O (/proc/interrupts; I/Os estimated as
    rate x (runtime + the 1 s ramp)); during the nvme-emu job, how often QEMU's vCPU thread
    and the emulator's loop thread were found on the same host CPU (shared %); per device,
    the time QEMU's vCPU thread was runnable but waited for a host CPU, and the time it
    ran, in % of the job (the rest it slept: the guest idle, or QEMU's lock)."""
    out = [f"{'guest side':36} {'busy % QEMU':>12} {'nvme-emu':>9} {'irq/IO QEMU':>12} {'nvme-emu':>9}"
           f" {'shared %':>9} {'vCPU wait % QEMU':>17} {'nvme-emu':>9} {'vCPU run % QEMU':>16}"
           f" {'nvme-emu':>9}"]
    for key, label, _args in JOBS:
        if f"qemu_{key}_gbusy" not in r and f"emu_{key}_gbusy" not in r:
            continue
        line = f"{label:36}"
        busy = [r.get(f"{n}_{key}_gbusy", float("nan")) / 10 for n in ("qemu", "emu")]
        irq = []
        for n in ("qemu", "emu"):
            ios = job_ios(key, r.get(f"{n}_{key}", 0.0), runtime)
            irq.append(r.get(f"{n}_{key}_girq", float("nan")) / ios if ios else float("nan"))
        line += f" {busy[0]:12.1f} {busy[1]:9.1f} {irq[0]:12.3f} {irq[1]:9.3f}"
        line += f" {r.get(f'emu_{key}_shared', float('nan')):9.0f}"
        line += f" {r.get(f'qemu_{key}_vwait', float('nan')):17.1f} {r.get(f'emu_{key}_vwait', float('nan')):9.1f}"
        line += f" {r.get(f'qemu_{key}_vrun', float('nan')):16.1f} {r.get(f'emu_{key}_vrun', float('nan')):9.1f}"
        out.append(line)
    return "\n".join(out)


def run_cli(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    counts: dict[str, dict[str, float]] | None = {} if args.count else None
    raw: dict[str, list[float]] = {}
    reports: list[str] = []
    r = run_bench(args.runtime, args.workdir, args.rounds, args.visible_writes,
                  [k for k in args.jobs.split(",") if k], args.sq_poll_idle_us, counts, args.attach,
                  args.append, args.pin, raw, args.attach_both, args.kprofile, reports, args.insn)
    print(report(r, args.runtime))
    for text in reports:
        print(text)
    if args.raw:
        for k, v in sorted(raw.items()):
            if k.startswith(("emu_", "qemu_")):
                print(f"  {k:28} " + " ".join(f"{x:9.0f}" for x in v))
    if counts is not None:
        print(report_counts(counts))
        if args.workdir is not None:
            (args.workdir / "counts.json").write_text(json.dumps(counts, indent=1, sort_keys=True))
    print(f"(one TCG guest, -smp 1, both disks in the same run; median of {args.rounds} rounds "
          f"of {args.runtime} s, order alternating; --visible-writes {args.visible_writes}; "
          f"{'guest kernel +' + repr(args.append) + '; ' if args.append else ''}"
          f"{'kernel profile=' + str(args.kprofile) + '; ' if args.kprofile is not None else ''}"
          f"{'TCG instruction counts; ' if args.insn else ''}"
          f"{'pinned: ' + args.pin + '; ' if args.pin else ''}"
          f"{time.monotonic() - t0:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
