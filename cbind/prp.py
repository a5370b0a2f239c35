"""The PRP list entry loop (NVMe Base 2.1 §4.1.1) in C, with its pure-Python fallback.

``emulator.nvme.prp.prp_segments`` reads each PRP list page chunk from guest
memory itself (so a list outside mapped memory still raises DmaError, a Data
Transfer Error) and hands the raw entries here.  ``merge_entries`` checks
each entry's offset and appends its page to the segment list, merging
physically contiguous pages.  For a 128 KiB transfer that is 32 entries per
command; the Python loop costs tens of microseconds, the C loop (cbind/prp.c,
cffi API mode, built lazily by cbind.build) a few.

``merge_entries`` is the C version when the module compiled and
``NVME_EMU_NO_CBIND`` is unset, else ``merge_entries_py``.  ``BACKEND`` says
which ("c" or "python"); ``build.why["prp"]`` says why not C.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Callable

from cbind import build

Segment = tuple[int, int]
# (raw entries, count, page size, bytes remaining, segments) -> index of the
# first entry with a nonzero offset, or -1 when all are page aligned.  The
# segment list is never empty (PRP1's segment comes first) and is extended in place.
MergeFn = Callable[[bytes, int, int, int, list[Segment]], int]

_CDEF = """
int64_t prp_list_merge(const char *raw, size_t n, uint64_t page_size,
                       uint64_t remaining, uint64_t *segs);
"""


def _read_source() -> str:
    try:
        here = Path(__file__)
        return here.with_name("le.h").read_text() + "\n" + here.with_name("prp.c").read_text()
    except OSError as e:
        build.why["prp"] = f"no C source: {e}"
        return ""


def append_segment(segs: list[Segment], addr: int, length: int) -> None:
    """Append [addr, addr+length), extending the last segment when contiguous."""
    if segs and segs[-1][0] + segs[-1][1] == addr:
        segs[-1] = (segs[-1][0], segs[-1][1] + length)
    else:
        segs.append((addr, length))


def merge_entries_py(raw: bytes, n: int, page_size: int, remaining: int,
                     segs: list[Segment]) -> int:
    """Pure Python: the first ``n`` entries of ``raw`` describe the next pages.

    §4.1.1: PRP list entries shall have a memory page offset of 0h; each
    describes a whole page except the last of the transfer.
    """
    mask = page_size - 1
    entries = struct.unpack_from(f"<{n}Q", raw)
    for i in range(n):
        e = entries[i]
        if e & mask:
            return i
        m = min(page_size, remaining)
        append_segment(segs, e, m)
        remaining -= m
    return -1


_SOURCE = _read_source()
_built = build.load("prp", _CDEF, _SOURCE) if _SOURCE else None
_SEGS = struct.Struct("=QQ")  # the C side writes native-endian qword pairs


def _make_merge_c(ffi: Any, lib: Any) -> MergeFn:
    new, buffer, merge = ffi.new, ffi.buffer, lib.prp_list_merge
    iter_pairs = _SEGS.iter_unpack

    def merge_entries_c(raw: bytes, n: int, page_size: int, remaining: int,
                        segs: list[Segment]) -> int:
        """C: same contract and results as :func:`merge_entries_py`."""
        if len(raw) < 8 * n:  # C would read past the buffer: Python raises struct.error
            return merge_entries_py(raw, n, page_size, remaining, segs)
        out = new("uint64_t[]", 2 * n + 2)
        try:
            out[0], out[1] = segs[-1]
            k: int = merge(raw, n, page_size, remaining, out)
        except (OverflowError, TypeError):  # past 64 bits, or raw not bytes: Python takes it
            return merge_entries_py(raw, n, page_size, remaining, segs)
        if k < 0:
            return -k - 1
        if k == 1:
            segs[-1] = (out[0], out[1])
        else:
            segs[-1:] = iter_pairs(buffer(out, 16 * k))
        return -1

    return merge_entries_c


merge_entries_c: MergeFn | None = _make_merge_c(*_built) if _built is not None else None
merge_entries: MergeFn = merge_entries_c or merge_entries_py
BACKEND = "c" if merge_entries_c is not None else "python"
