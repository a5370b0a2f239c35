"""The C half of the I/O fast path (cbind/ioq.c), built lazily by cbind.build.

The interface is the three structs between the ``BEGIN CDEF`` / ``END CDEF``
markers of ioq.c (read from there, so it is declared once):

- ``struct ioq_region``: a guest-memory region the C code may load from and
  store into directly (IOVA, length, host address, writable);
- ``struct ioq_ns``: an attached namespace (nsid, backing fd, LBA shift, NSZE,
  the allocation bitmap's words and its sidecar fd for the write-through);
- ``struct ioq_batch``: one call, for one SQ and its CQ: the two tables, the
  ring addresses and sizes, page size, MDTS in bytes, the lowest address a
  store may go to directly, the arbiter's limit; SQ head and tail, CQ head,
  tail and phase in and out; commands done, why it stopped, counters and
  latency buckets out.

``ioq_run(batch)`` serves Read/Write commands from the SQ head until the SQ
is empty, the limit is reached, the CQ is full or a command needs Python
(``emulator/nvme/fastpath.py`` says which); it never consumes a command it
did not complete.  ``ioq_serve(batch, sq_head, sq_tail, cq_head, cq_tail,
cq_phase, limit)`` is the same with the ring state as arguments (the fast
path keeps one batch struct per SQ, so a call stores no field from Python);
the new SQ head, CQ tail and phase follow from the count it returns, and the
counters come back in ``batch.out`` (one ``ffi.unpack``).  ``LIB`` is None when the module did not build or
``NVME_EMU_NO_CBIND`` is set (``build.why["ioq"]`` says why).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cbind import build


# le.h (shared loads), ioq.c, then sqwait.c (the shadow tail poller, built on ioq.c's
# statics): one module
FILES = ("le.h", "ioq.c", "sqwait.c")


def _read_source() -> str:
    try:
        return "\n".join(Path(__file__).with_name(f).read_text() for f in FILES)
    except OSError as e:
        build.why["ioq"] = f"no C source: {e}"
        return ""


SOURCE = _read_source()
_blocks = re.findall(r"/\* BEGIN CDEF[^\n]*\n(.*?)/\* END CDEF \*/", SOURCE, re.S)
CDEF = "".join(re.sub(r"/\*.*?\*/", "", b, flags=re.S) for b in _blocks)
# why a batch stopped: name -> ioq_batch.stop value (the IOQ_STOP_ defines of ioq.c)
STOP = {k.lower(): int(v) for k, v in re.findall(r"#define IOQ_STOP_(\w+) (\d+)", SOURCE)}
# why an entry left sqw_wait: name -> sqw_entry.stop value (the SQW_ defines of sqwait.c)
SQW = {k.lower(): int(v) for k, v in re.findall(r"#define SQW_(\w+) (\d+)", SOURCE)}

_built = build.load("ioq", CDEF, SOURCE) if CDEF else None
FFI: Any = _built[0] if _built is not None else None
LIB: Any = _built[1] if _built is not None else None


def host_address(buf: memoryview) -> int:
    """Address of the first byte of ``buf`` (read-only buffers too); holds no export."""
    p = FFI.from_buffer("char[]", buf, require_writable=False)
    try:
        return int(FFI.cast("uintptr_t", p))
    finally:
        FFI.release(p)
