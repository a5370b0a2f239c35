"""The I/O fast path: NVM Read and Write with PRPs or SGLs, from SQE fetch to CQE post.

``Controller.run_sq`` asks :meth:`FastPath.run` first.  It serves the
commands at the SQ head, in order, as long as each one is *common*, and
returns how many it completed; the first command that is not common stays at
the head and the normal path (``Controller.execute`` with the handlers of
emulator/nvme/io_cmds.py) runs it, after which the fast path is asked again.
So a batch that mixes both kinds still completes in SQ order, and everything
the fast path does not handle keeps the normal path's semantics exactly.

It never reports an error itself: any command that would fail (or that it
cannot finish as the normal path would) goes to the normal path, which
records the error log entry and the spec's status (LBA Out of Range, Invalid
Field for MDTS, PRP Offset Invalid, Data Transfer Error for DMA outside
mapped memory, Capacity Exceeded, ...).  A command is consumed only once its
CQE is posted; its data transfer is idempotent, so one that stops half way
(a short or failed ``preadv``/``pwritev``) is simply run again.

What a completed fast command does, as io_cmds.read/write would: LBA range
and MDTS checks, PRP walk (PRP lists and chains too, Base 2.1 §4.1.1) or SGL
walk (Base 2.1 §4.3.2, the shapes Linux sends: SGL1 a Data Block descriptor,
or a Last Segment descriptor whose segment holds only Data Blocks; the
``sgl_commands`` counter as Controller.data_segments keeps it),
``preadv``/``pwritev`` straight between the backing file and guest memory,
on a write the allocation bitmap update with its write-through to the
sidecar (AllocationMap.mark_allocated, TP4165), the SMART counters
(``ctrl.stats``), ``ctrl.xfer_bytes``, ``ctrl.cmd_stats`` (per opcode and
latency bucket), the CQE with SQHD and the phase tag (§4.2.4; the dword
holding the phase last), and the CQ's pending-interrupt count: interrupts
are still fired only by ``Controller.flush_interrupts``.

Two implementations with the same semantics: ``python`` (lean, the
reference and fallback; emulator/nvme/fastpath_py.py) and ``c`` (cbind/ioq.c
through cffi; its tables in emulator/nvme/fastpath_c.py).  The path is
``c`` when the C module built, ``python`` with ``NVME_EMU_NO_CBIND=1`` or
without a compiler, ``off`` (no fast path at all) with
``NVME_EMU_FASTPATH=off``; ``NVME_EMU_FASTPATH=python`` picks Python too.
:func:`set_path` changes it at run time (tests run both).

Conditions checked on every call, any one of which leaves the work to the
normal path (each condition's source in brackets):

Controller and memory, for the whole call:
  * the admin SQ (its opcodes are not NVM ones: 02h is Get Log Page);
  * guest memory whose ``direct()`` is None: write observers registered
    (host-memory dirty tracking, TP4159 Track Send SEL 1h, memtrack.py),
    visible writes in mode ``all``, or DMA_WRITE messages still pending
    (emulator/vfio_user/dmawrite.py keeps the device's write order);
  * an ``on_write`` observer other than TP4159 user-data change logging and
    the Sanitize Status GDE bit, or one of these active for this controller
    (udlog.py: a UDMQ logging; sanitize.py: GDE set, which a write clears);
    vfio-user migration's dirty logging (devmig.py) is such an other one;
  * Read/Write handlers of the I/O table replaced;
  * the CQ missing, or holding completions (``CQState.held``: a full CQ
    whose entries wait for the host), or full (the normal path refreshes
    the head from the shadow doorbell and arms EventIdx first);
  * an SQ ring not inside one direct region, a CQ ring not inside one
    writable direct region, or a CQ below the lowest directly writable
    address (visible writes ``boot``: the first MiB).
  * a sanitize operation in progress in the subsystem (the normal path aborts
    I/O commands other than Flush with Sanitize In Progress, Base 2.1 §8.1.24);
  (Suspended (TP4159), not ready, no memory: run_sq does not fetch at all.)

How they are checked (each call is a doorbell; at QD1 every command pays this): the
ones that are costly to work out are worked out by ``FastPath._conditions`` and kept
until ``fastgen.value`` moves (emulator/nvme/fastgen.py lists the places that bump it):
which on_write observers are active (a UDMQ logging this controller), a sanitize in
progress, the attached namespaces that are plain (attached, open, no Write
Uncorrectable marks, geometry, bitmap; the C namespace table).  What no bump can see is
compared on every call, cheaply: the on_write observer list (a copy of it), the size of
each attached namespace's instance dict (a data method set on it), the data methods of
the class, the I/O table's Read/Write handlers, ``direct()``, the region generation,
GDE, the CQ.  Per SQ, the ring places (Python) or the C batch struct are kept while the
SQState/CQState objects, the region table, the namespace table, CC and MDTS are the same.
A missed bump where a condition stops holding only keeps the fast path aside longer; so
every bump that matters is where a condition starts to hold (tests/controller/
test_fastpath_cache.py changes each between two calls on one controller).

The region table is rebuilt whenever the controller's memory changes (the
on_memory hook: attach, detach, DMA map) or its region list does
(MappedMemory.generation).  It holds the regions' own views, which
MappedMemory releases when it unmaps them; the views of rings and data
buffers cut from them live for one call only, so the fast path never keeps an
unmapped region or a gone client's memfd mapped.

Per command (the command and all after it go to the normal path):
  * an opcode other than Read (02h) / Write (01h); FUA on a Write (a flush);
    fused commands; PSDT 10b (SGL, MPTR a descriptor) or 11b;
  * a namespace not attached, or with Write Uncorrectable marks (a read must
    fail, a write heals them), or whose data methods (read_into, write_from,
    _transfer) are replaced on the instance or the class, or a subclass;
  * an LBA range past NSZE, a transfer past MDTS;
  * a PRP the normal path refuses (offsets, chains), or a data buffer, PRP
    list or part of it outside the direct regions: not mapped, mapped
    without an fd, *guarded* (a memfd not sealed against shrinking: its
    loads and stores go through emulator/memory/safecopy.py), read-only for
    a Read's data; a Read's data below the lowest directly writable address;
  * an SGL other than a Data Block (sub type 0h) in SGL1 or a Last Segment in
    SGL1 whose segment holds only Data Blocks: Segment descriptors (chains),
    Bit Bucket, Keyed and Transport descriptors, other sub types; a segment
    of 0 bytes, not a multiple of 16, or of MAX_DESCRIPTORS descriptors or
    more; Data Block lengths that do not add up to the transfer exactly (the
    normal path fails both a shorter and a longer list: Data SGL Length
    Invalid); a segment not inside one direct region, data outside them, as
    for PRPs (sgl.py's statuses come from the normal path);
  * more than IOV_MAX (1024) pieces; a short or failed ``preadv``/``pwritev``.
"""
from __future__ import annotations

import bisect
import logging
import os
from typing import TYPE_CHECKING, Any

from cbind import ioq
from emulator.nvme import fastgen, io_cmds, sanitize
from emulator.nvme.fastpath_c import CPath
from emulator.nvme.fastpath_py import LITTLE as _LITTLE, READ, WRITE, run_py
from emulator.nvme.migration import cdq, udlog
from emulator.nvme.namespace import Namespace

if TYPE_CHECKING:
    from emulator.memory import MappedMemory
    from emulator.nvme.controller import Controller
    from emulator.nvme.state import CQState, SQState

log = logging.getLogger("nvme.fastpath")

PATHS = ("c", "python", "off")
_UNLIMITED = 1 << 30


def _default_path() -> str:
    want = os.environ.get("NVME_EMU_FASTPATH", "").strip().lower()
    if want == "off":
        return "off"
    if want == "python" or ioq.LIB is None:
        return "python"
    return "c"


PATH = _default_path()


def set_path(path: str) -> str:
    """Use ``path`` ("c", "python" or "off") from now on; returns the previous one.
    "c" without the built module is "python"."""
    global PATH
    if path not in PATHS:
        raise ValueError(f"fast path {path!r} (one of {', '.join(PATHS)})")
    old, PATH = PATH, ("python" if path == "c" and ioq.LIB is None else path)
    return old


# The data methods of Namespace the normal path goes through: replaced on the class or on
# an instance (tests inject faults that way), or a subclass, and the fast path stays away.
_NS_METHODS = ("read_into", "write_from", "_transfer")
_NS_ORIGINAL = tuple(getattr(Namespace, m) for m in _NS_METHODS)
_READ_INTO, _WRITE_FROM, _TRANSFER = _NS_ORIGINAL
_READ_HANDLER, _WRITE_HANDLER = io_cmds.read, io_cmds.write  # the handlers the fast path repeats


def _plain(ns: Namespace) -> bool:
    """A namespace the fast path may serve: no Write Uncorrectable marks, open, its data
    methods the ones of this source."""
    if type(ns) is not Namespace or ns.uncorrectable or ns.fd < 0:
        return False
    d = vars(ns)
    if "read_into" in d or "write_from" in d or "_transfer" in d:
        return False
    return (Namespace.read_into, Namespace.write_from, Namespace._transfer) == _NS_ORIGINAL


def _udlog_active(ctrl: "Controller") -> bool:
    """udlog.on_write logs this controller's writes: a UDMQ for it is logging."""
    found = cdq.udmq_of(ctrl)
    return found is not None and found[1].logging


def _gde_set(ctrl: "Controller") -> bool:
    """sanitize.on_write acts on this controller's writes: its Sanitize Status has GDE set."""
    record = ctrl.state.vendor.get(sanitize.VENDOR_KEY)
    return record is not None and bool(record[0] & sanitize.SSTAT_GDE)


class _Regions:
    """The direct regions of one MappedMemory generation, for lookups."""
    __slots__ = ("memory", "generation", "starts", "ends", "mems", "writable", "ctable", "n")

    def __init__(self, memory: "MappedMemory") -> None:
        self.memory = memory
        self.generation = memory.generation
        rs = [r for r in memory.regions() if r.mem is not None and not r.guarded]
        self.starts = [r.iova for r in rs]
        self.ends = [r.end for r in rs]
        self.mems = [r.mem for r in rs]
        self.writable = [r.writable for r in rs]
        self.n = len(rs)
        self.ctable: Any = None
        if ioq.LIB is not None and rs:
            t = ioq.FFI.new("struct ioq_region[]", len(rs))
            for i, r in enumerate(rs):
                t[i].iova, t[i].len, t[i].writable = r.iova, r.size, int(r.writable)
                t[i].host = ioq.host_address(r.mem)  # type: ignore[arg-type]
            self.ctable = t

    def ring(self, addr: int, length: int, write: bool) -> memoryview | None:
        """A view of [addr, addr+length) inside one region, or None."""
        p = self.place(addr, length, write)
        return None if p is None else p[0][p[1]:p[2]]

    def place(self, addr: int, length: int, write: bool) -> tuple[memoryview, int, int] | None:
        """(region view, offset, end offset) of [addr, addr+length) inside one region, or None."""
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0 or addr + length > self.ends[i] or (write and not self.writable[i]):
            return None
        off = addr - self.starts[i]
        return self.mems[i], off, off + length

    def views(self, addr: int, n: int, write: bool, out: list[memoryview]) -> bool:
        """Append views of [addr, addr+n) (region by region, like MappedMemory.views)."""
        starts, ends = self.starts, self.ends
        i = bisect.bisect_right(starts, addr) - 1
        while n:
            if i < 0 or i >= self.n or addr < starts[i] or addr >= ends[i]:
                return False
            if write and not self.writable[i]:
                return False
            k = min(n, ends[i] - addr)
            off = addr - starts[i]
            out.append(self.mems[i][off:off + k])  # type: ignore[index]
            addr += k
            n -= k
            i += 1
        return True


class FastPath:
    """The fast path of one controller: cached tables, the two implementations."""

    def __init__(self, ctrl: "Controller") -> None:
        self.ctrl = ctrl
        self.regions: _Regions | None = None
        self._bitmaps: dict[int, tuple[Any, memoryview, memoryview]] = {}  # id(map) -> (map, words, bytes)
        # The conditions of a call, worked out again when fastgen.value moves (module text):
        self._gen = -1
        self._hooks: list[Any] = [object()]  # the on_write observers they were worked out with
        self._ok = False  # no observer that must see the writes, no sanitize in progress
        self._gde = False  # sanitize.on_write registered: GDE is looked at on every call
        # nsid -> (fd, lba_shift, nsze, map, TLBAAG, granules, the map's words)
        self._nss: dict[int, tuple[Any, ...]] = {}
        self._watch: list[tuple[dict[str, Any], int]] = []  # (vars(ns), its size): methods set on it
        self.c = CPath(log) if ioq.LIB is not None else None  # the C implementation's tables
        self._rings: dict[int, tuple[Any, ...]] = {}  # sqid -> the Python path's ring places (fastpath_py._ring)
        self._memory: Any = None
        self._direct: Any = None
        self._failed = False
        self.completed = {"c": 0, "python": 0}  # commands completed, by implementation
        ctrl.observers.on_memory.append(self._memory_changed)

    def _memory_changed(self, ctrl: "Controller") -> None:
        """A client attached, detached or mapped memory: drop the cached views of the old
        regions, so that the mappings the memory closed are not kept alive by them."""
        self.regions = None
        if self.c is not None:
            self.c.batches.clear()
        self._rings.clear()

    # ------------------------------------------------------------------ entry
    def run(self, sq: "SQState", limit: int | None) -> int:
        """Serve common commands at ``sq``'s head (at most ``limit``); how many completed.

        Paid on every doorbell, so kept short: what rarely changes is worked out in
        :meth:`_conditions`, ``fastpath_py._ring`` and ``CPath.run`` (per SQ), and checked here
        with a comparison or two."""
        path = PATH
        if path == "off" or not sq.qid:  # admin opcodes are not NVM ones (02h: Get Log Page)
            return 0
        ctrl = self.ctrl
        try:
            ready = self._ready(sq)
            if ready is None:
                return 0
            cq, regions, min_write = ready
            lim = _UNLIMITED if limit is None else limit
            if path == "c" and self.c is not None and regions.ctable is not None and _LITTLE:
                n, writes, rbytes, wbytes, sgls = self.c.run(ctrl, sq, cq, lim, regions, min_write)
                if n:
                    self._account(cq, n - writes, writes, rbytes, wbytes, n, sgls)
            else:
                path = "python"
                n = run_py(self, sq, cq, lim, regions, min_write)
            if n:
                completed = self.completed
                if not completed[path]:
                    log.info("ctrl %d: I/O fast path (%s) serves Reads and Writes", ctrl.cntlid, path)
                completed[path] += n
            return n
        except Exception:  # a bug here must not stop the controller: the normal path goes on
            self._failure()
            return 0

    def _failure(self) -> None:
        """Log a failure of the fast path (the first one with its traceback)."""
        if not self._failed:
            log.exception("ctrl %d: I/O fast path failed; the normal path takes over", self.ctrl.cntlid)
        self._failed = True

    def _ready(self, sq: "SQState") -> "tuple[CQState, _Regions, int] | None":
        """(CQ, region table, lowest directly writable address) when the fast path may
        serve ``sq`` now (the conditions of the module text that hold for a whole call)."""
        ctrl = self.ctrl
        memory = ctrl.memory
        if memory is not self._memory:
            self._memory = memory
            self._direct = getattr(memory, "direct", None)
        direct = self._direct
        d = direct() if direct is not None else None
        if d is None:
            return None
        mm, min_write = d
        regions = self.regions
        if regions is None or regions.memory is not mm or regions.generation != mm.generation:
            regions = self.regions = _Regions(mm)
        io = ctrl.tables.io
        if (io.get(READ) is not _READ_HANDLER or io.get(WRITE) is not _WRITE_HANDLER
                or Namespace.read_into is not _READ_INTO or Namespace.write_from is not _WRITE_FROM
                or Namespace._transfer is not _TRANSFER):
            return None  # replaced (tests inject faults that way)
        if self._gen != fastgen.value or ctrl.observers.on_write != self._hooks:
            self._conditions()
        else:
            for d_, n in self._watch:
                if len(d_) != n:  # an attribute set on a namespace: a data method replaced?
                    self._conditions()
                    break
        if not self._ok or (self._gde and _gde_set(ctrl)):
            return None
        cq = ctrl.cqs.get(sq.cqid)
        if cq is None or cq.held:
            return None
        return cq, regions, min_write

    def c_batch(self, sq: "SQState") -> "tuple[Any, CQState] | None":
        """The C batch struct of I/O SQ ``sq`` and its CQ, when the C fast path may serve
        it now (emulator/nvme/sqwait.py serves it from C while the loop waits); else None."""
        if PATH != "c" or self.c is None or not sq.qid or not _LITTLE:
            return None
        try:
            ready = self._ready(sq)
            if ready is None or ready[1].ctable is None:
                return None
            cq, regions, min_write = ready
            return self.c.batch(self.ctrl, sq, cq, regions, min_write), cq
        except Exception:
            self._failure()
            return None

    # ------------------------------------------------------------------ shared
    def _conditions(self) -> None:
        """Work out again what the per-call checks use (fastgen.value moved, the on_write
        observers changed, or a namespace got an attribute)."""
        ctrl = self.ctrl
        gen = fastgen.value  # read first: a change while we look bumps it again
        hooks = list(ctrl.observers.on_write)
        ok, gde = True, False
        for hook in hooks:
            if hook is sanitize.on_write:
                gde = True  # GDE changes on every first Write after a sanitize: looked at per call
            elif hook is not udlog.on_write or _udlog_active(ctrl):
                ok = False  # an observer that must see the writes
        if sanitize.running(ctrl) is not None:  # I/O aborted with Sanitize In Progress
            ok = False
        sub = ctrl.subsystem
        nss = sub.namespaces
        eligible = []
        watch = []
        for nsid in sorted(sub.attached(ctrl.cntlid)):
            ns = nss.get(nsid)
            if ns is None:
                continue
            watch.append((vars(ns), len(vars(ns))))  # all of them: a method set, then removed
            if _plain(ns):
                amap = ns.allocation
                eligible.append((nsid, ns, amap, ns.fd, ns.lba_shift, ns.nsze, amap.sidecar_fd))
        self._nss = {e[0]: (e[3], e[4], e[5], e[2], e[2].tlbaag, e[2].granules,
                            self._bitmap(e[2])[0] if _LITTLE else None) for e in eligible}
        self._watch = watch
        if self.c is not None:
            self.c.namespaces(eligible)
        self._hooks, self._ok, self._gde, self._gen = hooks, ok, gde, gen

    def _bitmap(self, amap: Any) -> tuple[memoryview, memoryview]:
        got = self._bitmaps.get(id(amap))
        if got is None or got[0] is not amap:
            if len(self._bitmaps) > 16:
                self._bitmaps.clear()
            b = memoryview(amap.bits).cast("B")
            got = self._bitmaps[id(amap)] = (amap, b.cast("Q"), b)
        return got[1], got[2]

    def _account(self, cq: "CQState", reads: int, writes: int, rbytes: int, wbytes: int,
                 posted: int, sgls: int) -> None:
        """SMART counters, xfer_bytes, cmd_stats opcodes, pending interrupts; the SGL
        commands counted as Controller.data_segments counts them."""
        ctrl = self.ctrl
        st = ctrl.stats
        if sgls:
            if not st.get("sgl_commands"):
                log.info("ctrl %d: the host uses SGLs (I/O fast path)", ctrl.cntlid)
            st["sgl_commands"] = st.get("sgl_commands", 0) + sgls
        ops = ctrl.cmd_stats.io.ops
        for opc, n, nbytes, commands, units in (
                (READ, reads, rbytes, "host_read_commands", "data_units_read"),
                (WRITE, writes, wbytes, "host_write_commands", "data_units_written")):
            if n:
                st[commands] += n
                st[units] += nbytes >> 9
                c = ops.get(opc)
                if c is None:
                    c = ops[opc] = [0, 0]
                c[0] += n
                c[1] += nbytes
        ctrl.xfer_bytes += rbytes + wbytes
        ctrl.note_posted(cq.qid, posted)
