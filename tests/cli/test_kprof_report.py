"""The guest kernel profile's console lines read back and reported (emulator/guest/kprof.py)."""
from __future__ import annotations

from emulator.guest import bench, kprof

CONSOLE = """\
@@RESULT qemu_seqread_kibs_1=51200
KPROF qemu_seqread_kibs_1 nvme_queue_rqs 30
KPROF qemu_seqread_kibs_1 gup_fast_fallback 10
KSTAT qemu_seqread_kibs_1 user 20
KSTAT qemu_seqread_kibs_1 ctxt 800
@@RESULT emu_seqread_kibs_1=51200
KPROF emu_seqread_kibs_1 __pfx_gup_fast_fallback 4
KPROF emu_seqread_kibs_1 gup_fast_fallback 6
KPROF emu_seqread_kibs_1 nvme_ns_head_submit_bio 5
KSTAT emu_seqread_kibs_1 user 30
KSTAT emu_seqread_kibs_1 ctxt 1200
KPROF emu_seqread_kibs_2 gup_fast_fallback 2
KPROF-ERROR /proc/kallsyms shows no addresses
noise KPROF emu_x_1 f 1
"""


def test_parse_sums_rounds_and_folds_padding_into_the_function() -> None:
    prof = kprof.parse(CONSOLE)
    assert prof["emu_seqread_kibs"] == {"gup_fast_fallback": 12, "nvme_ns_head_submit_bio": 5,
                                        "[user]": 30, "[ctxt]": 1200}
    assert prof["qemu_seqread_kibs"]["nvme_queue_rqs"] == 30
    assert "emu_x" not in prof


def test_ios_of_counts_each_runs_ios_over_its_profiled_time() -> None:
    results = {"emu_seqread_kibs_1": "51200", "emu_seqread_kibs_2": "25600",
               "emu_seqread_kibs_go_1": "1", "emu_seqread_kibs_gbusy_1": "900",
               "qemu_randread_iops_1": "1000", "qemu_randread_iops_2": "x"}
    ios = bench.ios_of(results, runtime=4)
    assert ios == {"emu_seqread_kibs": (400 + 200) * 5, "qemu_randread_iops": 1000 * 5}


def test_report_puts_the_largest_differences_first() -> None:
    prof = kprof.parse(CONSOLE)
    text = kprof.report(prof, {"qemu_seqread_kibs": 1000.0, "emu_seqread_kibs": 1000.0})
    lines = text.splitlines()
    first = lines.index(next(x for x in lines if x.strip().startswith("function"))) + 1
    # per I/O at 250 Hz: nvme_queue_rqs 30 ticks x 4000 µs / 1000 I/Os = 120 µs against 0
    assert lines[first].split()[0] == "nvme_queue_rqs" and lines[first].split()[-1] == "-120.0"
    user = next(x for x in lines if x.strip().startswith("user"))
    assert user.split()[1:] == ["200.0", "300.0", "+100.0"]  # USER_HZ 100: 10 ms a jiffy
    ctxt = next(x for x in lines if x.strip().startswith("ctxt"))
    assert ctxt.split()[-3:] == ["0.80", "1.20", "+0.40"]


def test_report_says_so_when_the_guest_printed_no_profile() -> None:
    # a guest kernel without CONFIG_PROFILING has no /proc/profile: no KPROF lines at all
    text = kprof.report(kprof.parse("KPROF-ERROR no /proc/profile: this kernel was built without "
                                    "CONFIG_PROFILING\n"), {"emu_seqread_kibs": 10.0})
    assert "CONFIG_PROFILING" in text and "KPROF-ERROR" in text
