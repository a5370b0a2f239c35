"""Benchmark: prp_segments with the C list-entry loop (cbind.prp) and the Python fallback.

    bash scripts/bench-cbind [--repeat 7]

PRP lists live in a real MappedMemory over a memfd (what the controller sees
under QEMU), 4 KiB memory pages.  Buffers of 4 KiB (PRP1 only), 128 KiB (a
31-entry PRP list) and 4 MiB (1023 entries: a list page that chains to a
second one, Base 2.1 §4.1.1), each contiguous (one merged segment) and
scattered (every page its own segment).  Prints the median time per call of
each loop, side by side, and the ratio.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import sys
import timeit

from cbind import build
from cbind import prp as cprp
from emulator.memory import MappedMemory
from emulator.nvme.prp import Segment, prp_segments

PS = 4096
IOVA = 0x1_0000_0000
MEM = 64 << 20  # data pages in the first 48 MiB, PRP list pages after
LISTS = IOVA + (48 << 20)


def write_lists(mem: MappedMemory, entries: list[int]) -> int:
    """Write ``entries`` as page-aligned PRP list pages from LISTS on; the address of the first."""
    per_page, addr = PS // 8, LISTS
    while len(entries) > per_page:  # full page: the last slot points to the next list page
        mem.write(addr, struct.pack(f"<{per_page}Q", *entries[:per_page - 1], addr + PS))
        entries, addr = entries[per_page - 1:], addr + PS
    mem.write(addr, struct.pack(f"<{len(entries)}Q", *entries))
    return LISTS


def case(mem: MappedMemory, length: int, scattered: bool) -> tuple[int, int]:
    """PRP1/PRP2 for a ``length`` buffer; scattered = no two pages adjacent, in random order."""
    npages = -(-length // PS)
    if scattered:
        pages = [IOVA + 2 * PS * k for k in random.Random(length).sample(range((LISTS - IOVA) // (2 * PS)), npages)]
    else:
        pages = [IOVA + PS * k for k in range(npages)]
    if npages == 1:
        return pages[0], 0
    if npages == 2:
        return pages[0], pages[1]
    return pages[0], write_lists(mem, pages[1:])


def per_call_us(fn: object, repeat: int) -> float:
    t = timeit.Timer(fn)  # type: ignore[arg-type]
    number, _ = t.autorange()
    return statistics.median(t.repeat(repeat, number)) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="timing runs per cell (median)")
    args = ap.parse_args(argv)
    c = cprp.merge_entries_c
    print(f"C loop: {'built' if c else 'NOT available: ' + build.why.get('prp', '?')}; "
          f"{PS // 1024} KiB pages; median of {args.repeat} runs; Python {sys.version.split()[0]}")
    fd = os.memfd_create("prp-bench", os.MFD_CLOEXEC)
    os.ftruncate(fd, MEM)
    mem = MappedMemory()
    mem.add(IOVA, MEM, fd)
    print(f"{'transfer':>9} {'buffer':>11} {'segments':>8} {'C (us)':>8} {'Python (us)':>11} {'ratio':>6}")
    try:
        for length in (4 << 10, 128 << 10, 4 << 20):
            for scattered in (False, True):
                prp1, prp2 = case(mem, length, scattered)

                def run(merge: cprp.MergeFn) -> list[Segment]:
                    return prp_segments(mem, prp1, prp2, length, PS, merge=merge)

                py_segs = run(cprp.merge_entries_py)
                t_py = per_call_us(lambda: run(cprp.merge_entries_py), args.repeat)
                if c is not None:
                    assert run(c) == py_segs, "C and Python loops disagree"
                    t_c = per_call_us(lambda: run(c), args.repeat)
                    cells = f"{t_c:8.2f} {t_py:11.2f} {t_py / t_c:5.1f}x"
                else:
                    cells = f"{'-':>8} {t_py:11.2f} {'-':>6}"
                size = f"{length >> 10} KiB" if length < 1 << 20 else f"{length >> 20} MiB"
                layout = "scattered" if scattered else "contiguous"
                print(f"{size:>9} {layout:>11} {len(py_segs):8d} {cells}")
    finally:
        mem.clear()
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
