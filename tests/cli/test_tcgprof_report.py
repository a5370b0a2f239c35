"""``bench --insn`` on the host's side (emulator/guest/tcgprof.py): kernel symbols, the
folding of block counts into instructions per I/O, areas and the report, and the
I/O rate of each fio run (bench.round_rates).  The plugin itself runs in
tests/guest/test_guest_tcgprof.py."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from emulator.guest import tcgprof
from emulator.guest.bench import round_rates

KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81001000 t nvme_queue_rqs
ffffffff81002000 T aio_complete
ffffffff81003000 t gup_fast_fallback
ffffffff81004000 d some_data
ffffffff81005000 T do_idle
"""
K = 0xFFFFFFFF81000000


def sampler() -> SimpleNamespace:
    # slots: 0 overflow, 1 user code, 2 nvme_queue_rqs, 3 aio_complete (entry), 4 do_idle
    blocks = tcgprof.Blocks(vaddr=np.array([0, 0x401000, K + 0x1010, K + 0x2000, K + 0x5000], dtype=np.uint64),
                            ninsn=np.array([0, 10, 20, 5, 7], dtype=np.uint32))
    delta = {
        # QEMU's device: 100 I/Os (aio_complete calls), nvme work 2x ours
        "qemu_randread_iops_1": (np.array([1, 2, 3]), np.array([1000, 200, 100], dtype=np.uint64)),
        "emu_randread_iops_1": (np.array([1, 2, 3, 4]), np.array([1000, 100, 100, 10], dtype=np.uint64)),
        "emu_randread_iops_go_1": (np.array([1]), np.array([5], dtype=np.uint64)),  # not a job's figure
    }
    return SimpleNamespace(client=SimpleNamespace(blocks=blocks), delta=delta,
                           cpu_ns={"qemu_randread_iops_1": 2_000_000, "emu_randread_iops_1": 1_000_000},
                           wall={"qemu_randread_iops_1": 2.0, "emu_randread_iops_1": 2.5})


def test_symbols_name_user_and_kernel_addresses() -> None:
    syms = tcgprof.Symbols(KALLSYMS)
    assert "some_data" not in syms.names  # text symbols only
    got = syms.name_of(np.array([0x401000, K + 0x1010, K + 0x2000, K + 0x5fff], dtype=np.uint64))
    assert got == ["[user]", "nvme_queue_rqs", "aio_complete", "do_idle"]
    assert syms.address("aio_complete") == K + 0x2000 and syms.address("nope") is None
    assert not tcgprof.Symbols("") and not tcgprof.Symbols("garbage line\nzz T x\n")


def test_fold_counts_ios_by_aio_complete_and_splits_user_kernel() -> None:
    costs = tcgprof.fold(sampler(), tcgprof.Symbols(KALLSYMS), {"emu_randread_iops_1": 999.0})
    assert set(costs) == {"qemu_randread_iops", "emu_randread_iops"}
    q, e = costs["qemu_randread_iops"], costs["emu_randread_iops"]
    assert q.ios == 100 and e.ios == 100  # aio_complete's entry block, not fio's figure
    assert q.insn_user == 10_000 and q.insn_kernel == 200 * 20 + 100 * 5
    assert e.by_name["nvme_queue_rqs"] == 2000 and e.by_name["do_idle"] == 70
    assert q.cpu_ns == 2_000_000


def test_fold_without_symbols_uses_fios_figures() -> None:
    costs = tcgprof.fold(sampler(), tcgprof.Symbols(""), {"emu_randread_iops_1": 20.0})
    assert costs["emu_randread_iops"].ios == 50  # 20 I/Os per second over the interval's 2.5 s and costs["qemu_randread_iops"].ios == 0
    assert not costs["emu_randread_iops"].by_name
    assert "randread_iops" not in tcgprof.report(costs)  # no I/Os for QEMU's: no section


def test_report_per_io_areas_and_differences() -> None:
    text = tcgprof.report(tcgprof.fold(sampler(), tcgprof.Symbols(KALLSYMS), {}), top=3)
    lines = {re.split(r"\s{2,}", ln.strip())[0]: ln for ln in text.splitlines()}
    assert "randread_iops:" in text
    assert lines["instructions per I/O"].split()[-2:] == ["145", "126"]
    assert lines["nvme driver"].split()[-2:] == ["40", "20"]
    assert lines["scheduler, idle, time"].split()[-2:] == ["0", "1"]
    assert lines["vCPU µs per I/O"].split()[-2:] == ["20.0", "10.0"]
    assert "nvme_queue_rqs" in text.split("most different first")[1]


def test_areas() -> None:
    assert tcgprof.area("[user]") == "user"
    assert tcgprof.area("nvme_irq") == "nvme driver"  # the driver's own, before "interrupts"
    assert tcgprof.area("asm_common_interrupt") == "interrupts"
    assert tcgprof.area("blk_mq_submit_bio") == "block, dma"
    assert tcgprof.area("__blk_rq_map_sg") == "block, dma"
    assert tcgprof.area("try_grab_folio_fast") == "pinning pages"
    assert tcgprof.area("io_submit_one") == "aio, syscalls"
    assert tcgprof.area("__schedule") == "scheduler, idle, time"
    assert tcgprof.area("memcpy") == "other kernel"


def test_read_kallsyms_stops_at_the_padding(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.seek(4096)
        f.write(KALLSYMS.encode() + b"\0" * 100 + b"stale")
    assert tcgprof.read_kallsyms(img, offset=4096) == KALLSYMS
    assert tcgprof.read_kallsyms(tmp_path / "missing.img") == ""


def test_round_rates() -> None:
    got = round_rates({"emu_seqread_kibs_1": "128000", "qemu_randread_iops_2": "1000",
                       "emu_randread_iops_go_1": "1", "emu_seqread_kibs_gbusy_1": "900",
                       "qemu_seqread_kibs_1": "n/a"})
    assert got == {"emu_seqread_kibs_1": 1000.0, "qemu_randread_iops_2": 1000.0}


class _FakeClient:
    """Snapshots from a list: (vCPU ns, counts per slot)."""

    def __init__(self, snaps: list[tuple[int, list[int]]]) -> None:
        self.snaps = iter(snaps)
        self.blocks = tcgprof.Blocks()

    def snapshot(self) -> tuple[int, np.ndarray]:
        cpu, counts = next(self.snaps)
        return cpu, np.array(counts, dtype=np.uint64)


def test_sampler_cuts_at_results_and_restarts_after_the_lead() -> None:
    results: dict[str, str] = {}
    client = _FakeClient([(0, [0, 0]), (10, [0, 5]), (30, [0, 9, 4]), (70, [0, 20, 10])])
    s = tcgprof.Sampler(results, client, lead=0.0)  # driven by hand, not started
    s.begin()                                  # snapshot 1
    results["emu_randread_iops_go_1"] = "1"
    s.tick()                                   # snapshot 2: the go interval
    assert s.delta["emu_randread_iops_go_1"][1].tolist() == [5] and s.cpu_ns["emu_randread_iops_go_1"] == 10
    s.tick()                                   # no result, the lead is over: snapshot 3, counts restart
    results["emu_randread_iops_1"] = "1000"
    results["emu_randread_iops_gbusy_1"] = "900"
    s.tick()                                   # snapshot 4: the job's interval, from snapshot 3
    idx, cnt = s.delta["emu_randread_iops_1"]
    assert dict(zip(idx.tolist(), cnt.tolist())) == {1: 11, 2: 6} and s.cpu_ns["emu_randread_iops_1"] == 40
    assert len(s.delta["emu_randread_iops_gbusy_1"][0]) == 0  # a second result at once: nothing


def test_sampler_stops_quietly_when_qemu_is_gone() -> None:
    results: dict[str, str] = {}
    s = tcgprof.Sampler(results, _FakeClient([(0, [0])]))  # one snapshot, then StopIteration
    s.begin()
    s.client.snapshot = lambda: (_ for _ in ()).throw(ConnectionError("gone"))  # type: ignore[method-assign]
    results["emu_randread_iops_1"] = "1"
    s.tick()
    assert s.gone and "emu_randread_iops_1" not in s.delta
    s.tick()  # no more tries


def test_qemu_args_refuse_a_socket_path_too_long(tmp_path: Path) -> None:
    assert tcgprof.qemu_args(Path("/x/p.so"), Path("/tmp/s.sock")) == ["-plugin", "/x/p.so,sock=/tmp/s.sock"]
    with pytest.raises(ValueError, match="too long"):
        tcgprof.qemu_args(Path("/x/p.so"), tmp_path / ("d" * 120) / "s.sock")
