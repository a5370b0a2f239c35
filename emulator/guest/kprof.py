"""The guest kernel's own profile per benchmark job (``bench --kprofile SHIFT``).

A diagnosis of what an I/O costs *inside* the TCG guest, where the host's profilers
see only translated code.  The guest kernel is booted with ``profile=SHIFT``
(Documentation/admin-guide/kernel-parameters.txt: the kernel's tick profiler, with
``CONFIG_PROFILING``): every timer tick that interrupts kernel code counts one hit in
the bucket of ``(pc - _stext) >> SHIFT`` of ``/proc/profile`` (kernel/profile.c; the
file's first word is the bucket size, ``1 << SHIFT``; writing to it clears it).  Ticks
in user mode are not counted there: /proc/stat's user time covers them.

The guest's script (``GUEST_SH``) resets the profile before each fio run and, after it,
folds the nonzero buckets into kernel functions with /proc/kallsyms (read as root in the
same boot, so KASLR does not matter) and prints one console line per function:
``KPROF <device>_<job>_<round> <function> <hits>``.  ``parse`` reads them back from the
console log and ``report`` prints the functions whose hits per I/O differ most between
the two devices.  At 250 Hz a 5 s job gets about 1,250 ticks: good for the functions
that cost tens of µs per I/O, not for the small ones.
"""
from __future__ import annotations

import re
from pathlib import Path

# Sourced by the benchmark's guest script.  Addresses are taken as offsets from
# 0xffffffff80000000 (kernel text lies in the 1 GiB above it, KASLR or not;
# busybox awk's numbers are doubles and its printf %d stops at 2^31 - 1).
GUEST_SH = r"""
if [ -r /proc/profile ]; then  # booted with profile=SHIFT (bench --kprofile)
    echo 0 > /proc/sys/kernel/kptr_restrict  # real addresses in /proc/kallsyms
    # (busybox awk reads nothing from /proc/kallsyms itself: hence cat)
    cat /proc/kallsyms \
        | awk '$2 ~ /^[tT]$/ && substr($1, 1, 8) == "ffffffff" {
                   a = ("0x" substr($1, 9)) + 0 - 2147483648; if (a >= 0) printf "%d %s\n", a, $3 }' \
        | sort -n > /tmp/ksyms
    [ "$(head -n1 /tmp/ksyms | cut -d' ' -f1)" = "$(tail -n1 /tmp/ksyms | cut -d' ' -f1)" ] && { echo "KPROF-ERROR /proc/kallsyms shows no addresses"; head -n2 /tmp/ksyms; tail -n2 /tmp/ksyms; rm /tmp/ksyms; }
elif grep -q 'profile=' /proc/cmdline; then
    echo "KPROF-ERROR no /proc/profile: this kernel was built without CONFIG_PROFILING"
fi
kstat() {  # cpu time by kind (USER_HZ), context switches and interrupts since boot
    awk '/^cpu / { print "user", $2 + $3; print "system", $4; print "idle", $5; print "iowait", $6
                   print "irq", $7; print "softirq", $8 }
         /^ctxt / { print "ctxt", $2 } /^intr / { print "intr", $2 }' /proc/stat
}
kprof_reset() { [ -s /tmp/ksyms ] && { echo 0 > /proc/profile; kstat > /tmp/kstat0; }; }
kprof_dump() {  # kprof_dump NAME: hits per kernel function since kprof_reset
    [ -s /tmp/ksyms ] || return 0
    kstat | awk -v job="$1" 'FILENAME == "/tmp/kstat0" { v[$1] = $2; next }
                             { print "KSTAT " job " " $1 " " $2 - v[$1] }' /tmp/kstat0 -
    hexdump -v -e '1/4 "%u\n"' /proc/profile | awk -v job="$1" '
        FILENAME == "/tmp/ksyms" { a[n] = $1; s[n++] = $2; if ($2 == "_stext") base = $1; next }
        FNR == 1 { step = $1; next }
        $1 > 0 {
            pc = base + (FNR - 2) * step; lo = 0; hi = n - 1
            while (lo < hi) { m = int((lo + hi + 1) / 2); if (a[m] <= pc) lo = m; else hi = m - 1 }
            c[s[lo]] += $1
        }
        END { for (f in c) print "KPROF " job " " f " " c[f] }' /tmp/ksyms -
}
"""

_LINE = re.compile(r"^K(PROF|STAT) (\S+) (\S+) (-?\d+)\s*$")
STATS = ("user", "system", "irq", "softirq", "idle", "iowait")  # /proc/stat's cpu line, USER_HZ
USER_HZ = 100


def parse(console: str) -> dict[str, dict[str, int]]:
    """``{device_job: {function: hits}}``, summed over the rounds, from a console log
    (``device_job`` is e.g. ``emu_seqwrite_kibs``).  /proc/stat's changes over the same
    time come as ``[user]``, ``[system]``, ... (USER_HZ), ``[ctxt]`` and ``[intr]``."""
    out: dict[str, dict[str, int]] = {}
    for line in console.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        run, fn, hits = m.group(2), m.group(3), int(m.group(4))
        fn = f"[{fn}]" if m.group(1) == "STAT" else fn.removeprefix("__pfx_")  # a bucket in padding
        head, _, rnd = run.rpartition("_")
        if not rnd.isdigit():
            continue
        per = out.setdefault(head, {})
        per[fn] = per.get(fn, 0) + hits
    return out


def report(prof: dict[str, dict[str, int]], ios: dict[str, float], hz: int = 250,
           top: int = 20) -> str:
    """Per job, the kernel functions with the largest difference in µs per I/O between
    the two devices (``ios``: I/Os of each ``device_job`` over all its rounds)."""
    if not prof:
        return ("kernel profile: none on the guest's console (a kernel without CONFIG_PROFILING has "
                "no /proc/profile; the console log's KPROF-ERROR lines say why)")
    out = []
    jobs = sorted({k.partition("_")[2] for k in prof})
    for job in jobs:
        q, e = prof.get(f"qemu_{job}", {}), prof.get(f"emu_{job}", {})
        nq, ne = ios.get(f"qemu_{job}", 0.0), ios.get(f"emu_{job}", 0.0)
        if not nq or not ne:
            continue
        tick_us = 1e6 / hz
        funcs = {f for f in set(q) | set(e) if not f.startswith("[")}
        per = {f: (q.get(f, 0) * tick_us / nq, e.get(f, 0) * tick_us / ne) for f in funcs}
        tq, te = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
        hq, he = sum(q.get(f, 0) for f in funcs), sum(e.get(f, 0) for f in funcs)
        out.append(f"guest µs per I/O, {job} (/proc/stat; {nq:.0f} / {ne:.0f} I/Os)")
        out.append(f"  {'':40} {'QEMU nvme':>10} {'nvme-emu':>10} {'diff':>8}")
        for st in STATS:
            a, b = (d.get(f"[{st}]", 0) * 1e6 / USER_HZ / n for d, n in ((q, nq), (e, ne)))
            out.append(f"  {st:40} {a:10.1f} {b:10.1f} {b - a:+8.1f}")
        for st in ("ctxt", "intr"):
            a, b = (d.get(f"[{st}]", 0) / n for d, n in ((q, nq), (e, ne)))
            out.append(f"  {st + ' per I/O':40} {a:10.2f} {b:10.2f} {b - a:+8.2f}")
        out.append(f"guest kernel µs per I/O by function, {job} (ticks in kernel code: QEMU nvme {hq}, "
                   f"nvme-emu {he}; all: {tq:.1f} / {te:.1f})")
        out.append(f"  {'function':40} {'QEMU nvme':>10} {'nvme-emu':>10} {'diff':>8}")
        for f, (a, b) in sorted(per.items(), key=lambda kv: -abs(kv[1][1] - kv[1][0]))[:top]:
            out.append(f"  {f[:40]:40} {a:10.1f} {b:10.1f} {b - a:+8.1f}")
    return "\n".join(out)


def load(console_log: Path) -> dict[str, dict[str, int]]:
    return parse(console_log.read_text(errors="replace"))
