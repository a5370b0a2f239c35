"""Diagnostic: count what the emulator does per I/O, from outside the hot path's code.

    python -m emulator.bench.iocount serve CONFIG.yaml [serve options]

runs ``nvme-emu serve`` with counters wrapped around the layers an I/O passes
(no source file of those layers changes), and adds the control-socket method
``debug.iocount`` (docs/control-socket.md) that returns them:

- ``msg.*``: vfio-user messages received, by type (``msg.posted_write``: the
  codec's hot path for a posted REGION_WRITE of 1-8 bytes; the others by
  message class, through ``Session.handle``);
- ``write.*`` / ``read.*``: region accesses by target: ``sqdb.io`` /
  ``sqdb.admin`` (SQ tail doorbells), ``cqdb.io`` / ``cqdb.admin`` (CQ head
  doorbells), ``bar0.regs`` (the NVMe registers below the doorbells),
  ``bar0.msix_table``, ``bar0.pba``, ``bar0.other``, ``config`` (PCI
  configuration space), ``region.N`` (any other region);
- ``irq.*``: ``irq.fire`` (the controller signalled a vector),
  ``irq.eventfd`` (an eventfd write), ``irq.masked`` (held as pending);
- ``loop.readable`` (socket-readable callbacks), ``sys.recvmsg``, ``sys.fionread``
  (the server asks whether more waits before reading on);
- ``io.fast`` (I/O commands the fast path completed, emulator/nvme/fastpath.py),
  ``io.fast_calls``, ``io.normal`` (I/O commands through ``Controller.execute``)
  and ``normal.WHY``: which fast-path condition sent each of those to the
  normal path (``sgl.TYPE``: the SGL type in DPTR, e.g. ``sgl.segment``, a chain the
  fast path leaves aside, or ``sgl.data_block`` / ``sgl.last_segment``, shapes it serves
  that failed there or that it could not reach; ``fua``, ``opcode.XX``,
  ``memory_not_direct`` (write observers, visible writes ``all``, pending
  DMA_WRITEs or unsealed memory), ``cq_held``, ``cq_full``, ``path_off``, ...);
  ``sgl.list_entries.N``: SGL commands whose DPTR points to a list of N descriptors;
  ``admin.opcode.XX`` for admin commands;
- ``gc.collections.N``: runs of Python's garbage collector, generation N;
- ``dbbuf.arm_sq`` (SQ EventIdx := the processed tail, barrier, re-check),
  ``dbbuf.arm_sq_raced`` (the re-check found a new tail),
  ``dbbuf.shadow_cq_read``: shadow doorbell work.

A wrapped method costs a Python call per event: the counts are exact, the
process's CPU time is not what an unwrapped run costs (measure that apart).
``emulator.guest.bench --count`` runs the emulator this way and prints the
counts per I/O of each guest job.
"""
from __future__ import annotations

import functools
import gc
import sys
import weakref
from collections import Counter
from typing import Any, Callable

COUNTS: Counter[str] = Counter()
_CONTROLLERS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_WHY: dict[int, str] = {}  # id(controller) -> why the fast path left the next command
_installed = False

FUA = 1 << 30  # CDW12 bit 30 (NVM CS 1.2 Figure 48)
SGL_TYPES = {0x0: "data_block", 0x1: "bit_bucket", 0x2: "segment", 0x3: "last_segment"}  # Base 2.1 Figure 120


def _wrap(owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    orig = getattr(owner, name)
    setattr(owner, name, functools.wraps(orig)(make(orig)))


def bar0_target(offset: int, nvme_size: int, table: tuple[int, int], pba: tuple[int, int]) -> str:
    """The class of a BAR0 offset: SQ tail / CQ head doorbell (CAP.DSTRD = 0), NVMe
    registers, MSI-X table or PBA."""
    from emulator.nvme.spec import DOORBELL_BASE
    if DOORBELL_BASE <= offset < nvme_size:
        idx = (offset - DOORBELL_BASE) >> 2
        kind = "cqdb" if idx & 1 else "sqdb"
        return f"{kind}.{'admin' if idx >> 1 == 0 else 'io'}"
    if 0 <= offset < DOORBELL_BASE:
        return "bar0.regs"
    if table[0] <= offset < table[0] + table[1]:
        return "bar0.msix_table"
    if pba[0] <= offset < pba[0] + pba[1]:
        return "bar0.pba"
    return "bar0.other"


def command_why(flags: int, opc: int, cdw12: int, prp2: int) -> str:
    """Why a command's own fields keep it off the fast path (fastpath.py's per-command
    conditions); ``other`` when they do not (namespace, range, PRP shape, memory)."""
    if flags & 0x3:
        return "fused"
    if flags & 0xC0:  # PSDT (CDW0 bits 15:14): SGL; DPTR byte 15 is the SGL identifier
        return "sgl." + SGL_TYPES.get((prp2 >> 60) & 0xF, "type_%x" % ((prp2 >> 60) & 0xF))
    if opc not in (0x01, 0x02):
        return f"opcode.{opc:02x}"
    if opc == 0x01 and cdw12 & FUA:
        return "fua"
    return "other"


def call_why(fp: Any, sq: Any) -> str | None:
    """Why FastPath.run leaves every command of this call (its whole-call conditions)."""
    from emulator.nvme import fastpath, io_cmds, sanitize
    ctrl = fp.ctrl
    if fastpath.PATH == "off":
        return "path_off"
    direct = getattr(ctrl.memory, "direct", None)
    d = direct() if direct is not None else None
    if d is None:
        return "memory_not_direct"
    io = ctrl.tables.io
    if io.get(fastpath.READ) is not io_cmds.read or io.get(fastpath.WRITE) is not io_cmds.write:
        return "handlers_replaced"
    if sanitize.running(ctrl) is not None:
        return "sanitize"
    if ctrl.observers.on_write and not getattr(fp, "_ok", True):
        return "write_observer"  # user-data change logging, vfio-user dirty logging, ...
    cq = ctrl.cqs.get(sq.cqid)
    if cq is None:
        return "no_cq"
    if cq.held:
        return "cq_held"
    if (cq.tail + 1) % cq.size == cq.head:
        return "cq_full"
    if cq.base < d[1]:
        return "cq_below_min_write"
    return None


def install() -> None:
    """Wrap the counters around the classes (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    from emulator.control.server import ControlServer
    from emulator.nvme import dbbuf
    from emulator.nvme.controller import Controller
    from emulator.nvme.fastpath import FastPath
    from emulator.pci.function import NvmePciFunction
    from emulator.vfio_user import server
    from emulator.vfio_user.irq import IrqTable
    from emulator.vfio_user.protocol import PCI_BAR0_REGION_INDEX, PCI_CONFIG_REGION_INDEX
    from emulator.vfio_user.session import Session
    c = COUNTS

    def target(fn: NvmePciFunction, index: int, offset: int) -> str:
        if index == PCI_CONFIG_REGION_INDEX:
            return "config"
        if index != PCI_BAR0_REGION_INDEX:
            return f"region.{index}"
        lay = fn.layout
        return bar0_target(offset, lay.nvme_size, (lay.table_offset, lay.table_size),
                           (lay.pba_offset, lay.pba_size))

    def region_write(orig: Callable[..., Any]) -> Callable[..., Any]:
        def w(self: NvmePciFunction, index: int, offset: int, data: bytes) -> None:
            c["write." + target(self, index, offset)] += 1
            return orig(self, index, offset, data)
        return w

    def region_read(orig: Callable[..., Any]) -> Callable[..., Any]:
        def w(self: NvmePciFunction, index: int, offset: int, count: int) -> bytes:
            c["read." + target(self, index, offset)] += 1
            return orig(self, index, offset, count)
        return w

    def posted_write(orig: Callable[..., Any]) -> Callable[..., Any]:
        def w(self: Session, region: int, offset: int, data: bytes) -> None:
            c["msg.posted_write"] += 1
            return orig(self, region, offset, data)
        return w

    def handle(orig: Callable[..., Any]) -> Callable[..., Any]:
        def w(self: Session, msg: Any) -> Any:
            c["msg." + type(msg).__name__] += 1
            return orig(self, msg)
        return w

    def trigger(orig: Callable[..., Any]) -> Callable[..., Any]:
        def w(self: IrqTable, index: int, subindex: int) -> bool:
            try:
                line = self._indexes[index]
                masked = line.masked[subindex] and line.trigger[subindex] is not None
            except (IndexError, AttributeError):
                masked = False
            ok = orig(self, index, subindex)
            c["irq.masked" if masked else ("irq.eventfd" if ok else "irq.unassigned")] += 1
            return ok
        return w

    def fire(orig: Callable[..., Any]) -> Callable[..., Any]:
        def w(self: NvmePciFunction, vector: int) -> None:
            c["irq.fire"] += 1
            return orig(self, vector)
        return w

    def fast_run(orig: Callable[..., Any]) -> Callable[..., Any]:
        def w(self: FastPath, sq: Any, limit: int | None) -> int:
            _CONTROLLERS.add(self.ctrl)
            _WHY.pop(id(self.ctrl), None)  # a reason is for the command right after this call only
            n = orig(self, sq, limit)
            if sq.qid:
                c["io.fast_calls"] += 1
                c["io.fast"] += n
                if not n and sq.head != sq.tail:
                    why = call_why(self, sq)
                    if why is not None:
                        _WHY[id(self.ctrl)] = why
            return n
        return w

    def execute(orig: Callable[..., Any]) -> Callable[..., Any]:
        def w(self: Controller, cmd: Any) -> None:
            why = _WHY.pop(id(self), None)
            if cmd.sqid:
                c["io.normal"] += 1
                c["normal." + (why or command_why(cmd.flags, cmd.opc, cmd.cdw12, cmd.prp2))] += 1
                if cmd.flags & 0xC0 and (cmd.prp2 >> 60) & 0xE == 0x2:  # a (Last) Segment: its list
                    c[f"sgl.list_entries.{(cmd.prp2 & 0xFFFFFFFF) // 16}"] += 1
            else:
                c[f"admin.opcode.{cmd.opc:02x}"] += 1
            return orig(self, cmd)
        return w

    def counted(key: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def make(orig: Callable[..., Any]) -> Callable[..., Any]:
            def w(*a: Any, **k: Any) -> Any:
                c[key] += 1
                return orig(*a, **k)
            return w
        return make

    def arm(orig: Callable[..., Any]) -> Callable[..., Any]:
        def w(ctrl: Any, sq: Any) -> bool:
            raced = orig(ctrl, sq)
            c["dbbuf.arm_sq"] += 1
            c["dbbuf.arm_sq_raced"] += bool(raced)
            return raced
        return w

    def control_init(orig: Callable[..., Any]) -> Callable[..., Any]:
        def w(self: ControlServer, *a: Any, **k: Any) -> None:
            orig(self, *a, **k)
            self.register("debug.iocount", lambda req: snapshot())
        return w

    _wrap(NvmePciFunction, "region_write", region_write)
    _wrap(NvmePciFunction, "region_read", region_read)
    _wrap(NvmePciFunction, "fire", fire)
    _wrap(Session, "posted_write", posted_write)
    _wrap(Session, "handle", handle)
    _wrap(IrqTable, "trigger", trigger)
    _wrap(FastPath, "run", fast_run)
    _wrap(Controller, "execute", execute)
    _wrap(server.VfioUserServer, "_on_readable", counted("loop.readable"))
    _wrap(server, "recv_chunk", counted("sys.recvmsg"))
    _wrap(server, "bytes_waiting", counted("sys.fionread"))
    _wrap(dbbuf, "arm_sq_event_idx", arm)
    _wrap(dbbuf, "refresh_cq_head", counted("dbbuf.shadow_cq_read"))
    _wrap(ControlServer, "__init__", control_init)


def snapshot() -> dict[str, Any]:
    """The counters, and per controller what decides the doorbell traffic."""
    from emulator.nvme import dbbuf, fastpath, sqpoll, sqwait
    from emulator.nvme.spec import FID
    ctrls = []
    for ctrl in list(_CONTROLLERS):
        ctrls.append({
            "cntlid": ctrl.cntlid,
            "shadow_doorbells": dbbuf.config(ctrl) is not None,
            "sq_poll_idle_us": getattr(ctrl.config, "sq_poll_idle_us", None),
            "interrupt_coalescing": ctrl.state.features.get(FID.INTERRUPT_COALESCING, 0),
            "io_sqs": sorted(q for q in ctrl.sqs if q),
            "sgl_commands": ctrl.stats.get("sgl_commands", 0),
            "fast_completed": dict(ctrl.fast.completed),
        })
    counts = dict(COUNTS)
    hubs = set()
    for ctrl in list(_CONTROLLERS):
        # the shadow tail poller: Python turns, commands found, re-arms, races at re-arm
        p = sqpoll.existing(ctrl)
        if p is not None:
            for k in ("turns", "found", "rearms", "races"):
                counts[f"poll.{k}"] = counts.get(f"poll.{k}", 0) + getattr(p, k)
        hub = sqwait.hub(ctrl)
        if hub is not None:
            hubs.add(hub)
    for hub in hubs:  # its turns in C: waits, ended by timeout / loop event, SQs handed back,
        # eventfd writes from C
        for k in ("waits", "timeouts", "events", "returns", "irqs"):
            counts[f"cwait.{k}"] = counts.get(f"cwait.{k}", 0) + getattr(hub, k)
        counts["io.cwait"] = counts.get("io.cwait", 0) + hub.served
    for gen, st in enumerate(gc.get_stats()):  # Python's garbage collector runs, per generation
        counts[f"gc.collections.{gen}"] = st["collections"]
    return {"path": fastpath.PATH, "counts": counts, "controllers": ctrls}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """``after - before`` of two ``counts`` dictionaries (keys of either)."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)
            if after.get(k, 0) != before.get(k, 0)}


def per_io(counts: dict[str, int]) -> dict[str, float]:
    """Every counter divided by the I/O commands completed (fast + normal)."""
    ios = counts.get("io.fast", 0) + counts.get("io.normal", 0) + counts.get("io.cwait", 0)
    return {k: v / ios for k, v in counts.items()} if ios else {}


def main(argv: list[str] | None = None) -> int:
    install()
    from emulator.cli import main as cli_main
    return cli_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
