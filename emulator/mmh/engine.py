"""The host-managed live migration flow (NVMe Base 2.1 §8.1.13), as a library.

``Engine(source, destination, options).run()`` moves the migratable
controller ``cntlid`` with its namespaces' data from the source process to the
destination process while the guest runs, and returns a :class:`Report`:

1. Preparation: both sides reachable; the destination has the same NSIDs,
   sizes and LBA formats, and no host on its controller (else refused before
   anything changes).  The destination's stale allocated data is deallocated.
   An LBA Migration Queue (Controller Data Queue, QT 0h) is created on the
   source MMC and logging starts (Track Send SEL 0h); host memory tracking
   starts on the guest's DMA regions (Track Send SEL 1h).
2. Pre-copy: Get LBA Status ATYPE 02h gives the allocated ranges, which are
   copied (read on the source MMC, write on the destination MMC).  Then the
   queue is drained and its entries applied in order (last written: copied;
   last deallocated: deallocated on the destination), round after round,
   until a round is small (``small_bytes``), stops shrinking, or
   ``max_rounds`` is reached.  A queue that fills (ESA 111b) stops logging and
   loses changes: logging restarts, the destination's allocation beyond the
   source's is deallocated and the whole allocated space copied again.
3. Suspend (Migration Send SEL 0h, DUDMQ=1, so the queue is deleted after the
   ESA 011b marker: that ends the logging); the last ranges are copied.
4. State: the source stops reading the guest's vfio-user connection (control
   socket; a message it read in part moves with the connection), Migration Receive gets the whole
   controller state (NVMe-defined and vendor); Set Controller State on the
   destination (whose controller was suspended during the preparation).
5. Hand-over: the connection, DMA and interrupt fds and the PCI function state
   go to the destination (control sockets, SCM_RIGHTS); Resume there, which
   commits: the destination has the source release the connection (its
   controller stays suspended for good) and reads it.  Then Track Receive
   reports the guest pages the source controller wrote while tracked.

Any failure before the destination's Resume undoes what was done: the
destination drops what it adopted, the source reads its connection again and
is resumed, logging and tracking stop.  ``before_switch`` (tests) runs after
the last copy, while both controllers are suspended.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from emulator.host.lm import HostCdq
from emulator.host.memory import HostMemory
from emulator.mmh.copier import Copier
from emulator.mmh.endpoint import Endpoint, MigrationError
from emulator.mmh.plan import precopy_done
from emulator.mmh.ranges import ChangeSet, Range, coalesce, split, subtract, total
from emulator.nvme.migration.wire import Esa, Lbacir

log = logging.getLogger("nvme-emu.migrate")

MAX_TRACKED_GRANULES = 1 << 24  # per target (docs/tp4159.md)


@dataclass
class Options:
    max_rounds: int = 10  # pre-copy rounds of logged ranges
    small_bytes: int = 256 << 10  # a round's ranges this small end the pre-copy
    lmq_slots: int = 4096  # LBA Migration Queue entries (32 bytes each)
    depth: int = 16  # copy commands in flight per side
    memory_bytes: int = 64 << 20  # the MMH's host memory (memfd)
    track_memory: bool = True  # Track Memory Changes on the guest's DMA regions


@dataclass
class Progress:
    phase: str
    round: int = 0
    bytes_copied: int = 0
    bytes_left: int = 0
    dirty_rate: float = 0.0  # bytes logged per second, last round
    eta_s: float | None = None


@dataclass
class Round:
    number: int
    bytes_logged: int
    bytes_copied: int
    seconds: float


@dataclass
class Report:
    ok: bool = False
    error: str | None = None
    rounds: int = 0  # copy passes of logged ranges, the one after the suspend included
    bytes_copied: int = 0
    bytes_allocated: int = 0
    bytes_logged: int = 0
    lmq_overflows: int = 0
    downtime_ms: float = 0.0  # Suspend sent -> the destination reads the connection
    total_ms: float = 0.0
    pages_reported: int = 0  # Track Receive: guest pages the source wrote while tracked
    round_stats: list[Round] = field(default_factory=list)
    phases_ms: dict[str, float] = field(default_factory=dict)
    downtime_steps_ms: dict[str, float] = field(default_factory=dict)  # where the downtime went

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if not self.ok:
            return f"migration failed: {self.error}"
        return (f"migrated: {self.rounds} rounds, {self.bytes_copied / 2**20:.1f} MiB copied "
                f"({self.bytes_allocated / 2**20:.1f} MiB allocated, {self.bytes_logged / 2**20:.1f} MiB "
                f"logged), downtime {self.downtime_ms:.1f} ms, total {self.total_ms / 1000:.2f} s, "
                f"{self.pages_reported} pages reported")


_STAGES = ("start", "connected", "logging", "suspended", "paused", "adopted", "resumed", "done")


class Engine:
    def __init__(self, source: Endpoint, destination: Endpoint, options: Options | None = None, *,
                 on_progress: Callable[[Progress], None] | None = None,
                 before_switch: Callable[["Engine"], None] | None = None,
                 on_stage: Callable[[str], None] | None = None) -> None:
        self.src, self.dst = source, destination
        self.opt = options or Options()
        self.on_progress = on_progress
        self.before_switch = before_switch
        self.on_stage = on_stage
        self.report = Report()
        self.progress = Progress("connect")
        self.stage = "start"
        self.mem: HostMemory | None = None
        self.copier: Copier | None = None
        self.lmq: HostCdq | None = None
        self.lmq_deleted = False
        self.tracking = False
        self.formats: dict[int, int] = {}  # nsid -> LBA size
        self.nsze: dict[int, int] = {}  # nsid -> LBAs
        self._t_phase = 0.0
        self._t_reported = 0.0
        self._phase_reported = ""
        self._t_step = self._t_suspend = 0.0

    # -- public -----------------------------------------------------------------------
    def run(self) -> Report:
        t0 = time.monotonic()
        try:
            self._phase("connect")
            self.mem = HostMemory(self.opt.memory_bytes, name="nvme-emu-mmh", sealed=True)
            self.src.connect(self.mem)
            self.dst.connect(self.mem)
            self.copier = Copier(self.src.host, self.dst.host, self.mem, depth=self.opt.depth)  # type: ignore[arg-type]
            self._set_stage("connected")
            self._phase("prepare")
            self._prepare()
            self._phase("pre-copy")
            self._precopy()
            self._phase("suspend")
            self._suspend_and_copy()
            self._phase("state")
            self._switch()
            self._phase("done")
            self.report.ok = True
        except Exception as e:
            self.report.error = str(e) if isinstance(e, MigrationError) else f"{type(e).__name__}: {e}"
            log.error("migration failed in stage %s: %s", self.stage, self.report.error)
            self._abort()
        finally:
            self._finish_phase()
            self.report.total_ms = (time.monotonic() - t0) * 1000
            if self.copier is not None:
                self.report.bytes_copied = self.copier.bytes_copied
            self.src.close()
            self.dst.close()
            if self.mem is not None:
                self.mem.close()
        return self.report

    # -- progress -------------------------------------------------------------------------
    def _step(self, name: str) -> None:
        """Close the downtime step ``name`` (started at the previous step)."""
        now = time.monotonic()
        self.report.downtime_steps_ms[name] = (now - self._t_step) * 1000
        self._t_step = now

    def _set_stage(self, stage: str) -> None:
        """Stages (what would need undoing): connected, logging, suspended, paused,
        adopted, resumed (committed), done."""
        self.stage = stage
        if self.on_stage is not None:
            self.on_stage(stage)

    def _phase(self, name: str) -> None:
        self._finish_phase()
        self.progress.phase = name
        self._t_phase = time.monotonic()
        self._emit()

    def _finish_phase(self) -> None:
        if self._t_phase:
            ph = self.progress.phase
            self.report.phases_ms[ph] = self.report.phases_ms.get(ph, 0.0) + (time.monotonic() - self._t_phase) * 1000

    def _emit(self) -> None:
        if self.copier is not None:
            self.progress.bytes_copied = self.copier.bytes_copied
        if self.on_progress is not None:
            self.on_progress(self.progress)
        self._report_to_emulators()

    # Each emulator's control socket learns the MMH's progress (migration.progress;
    # `nvme-emu status` shows it): on a phase change, else at most every REPORT_EVERY_S,
    # and never between Suspend and Resume.
    REPORT_EVERY_S = 0.25

    def _report_to_emulators(self) -> None:
        if self.stage in ("suspended", "paused", "adopted"):
            return  # the guest waits: no control round trips inside the downtime
        now = time.monotonic()
        p = self.progress
        if p.phase == self._phase_reported and now - self._t_reported < self.REPORT_EVERY_S:
            return
        self._t_reported, self._phase_reported = now, p.phase
        params = {"phase": p.phase, "round": p.round, "bytes_copied": p.bytes_copied,
                  "bytes_left": p.bytes_left, "dirty_rate": p.dirty_rate, "eta_s": p.eta_s}
        for end in (self.src, self.dst):
            if end.control is None:
                continue
            try:
                end.control.call("migration.progress", params)
            except Exception as e:  # progress is informative: the migration goes on without it
                log.warning("%s: migration.progress not accepted: %s", end.name, e)

    # -- 1. preparation -------------------------------------------------------------------
    def _prepare(self) -> None:
        src, dst = self.src, self.dst
        assert src.lm is not None and dst.lm is not None
        nsids = src.namespaces
        if not nsids:
            raise MigrationError(f"source controller {src.cntlid} has no namespaces")
        if dst.namespaces != nsids:
            raise MigrationError(f"destination controller {dst.cntlid} has namespaces {dst.namespaces}, "
                                 f"the source's has {nsids}")
        for ep in (src, dst):
            attached = set(ep.lm.active_nsids())  # type: ignore[union-attr]
            missing = [n for n in nsids if n not in attached]
            if missing:
                raise MigrationError(f"{ep.name} MMC {ep.mmc_cntlid} cannot reach namespaces {missing}: "
                                     "attach them to the MMC (controllers[].namespaces in its YAML)")
        for nsid in nsids:
            a, b = src.lm.namespace_format(nsid), dst.lm.namespace_format(nsid)
            if (a.nsze, a.lba_size, a.ms) != (b.nsze, b.lba_size, b.ms):
                raise MigrationError(f"namespace {nsid} differs: source {a.nsze} x {a.lba_size} B "
                                     f"(ms {a.ms}), destination {b.nsze} x {b.lba_size} B (ms {b.ms})")
            self.formats[nsid] = a.lba_size
            self.nsze[nsid] = a.nsze
        s_info, d_info = src.call("session.info", cntlid=src.cntlid), dst.call("session.info", cntlid=dst.cntlid)
        if not s_info["connected"]:
            raise MigrationError(f"source controller {src.cntlid} has no host connected: nothing to move")
        if d_info["connected"]:
            raise MigrationError(f"destination controller {dst.cntlid} already has a host connected")
        # Stale data on the destination (a previous migration): deallocate it all.
        for nsid in nsids:
            stale = dst.lm.allocated(nsid)
            for i in range(0, len(stale), 256):  # Dataset Management: 256 ranges per command
                chunk = [r for r in split(stale[i:i + 256], 0xFFFFFFFF)]
                c = dst.host.deallocate(nsid, chunk)  # type: ignore[union-attr]
                if not c.ok:
                    raise MigrationError(f"destination: cannot deallocate stale data of namespace {nsid}")
        # The destination's controller waits suspended for the state (Set Controller State
        # needs it suspended or enabled; it is not enabled).
        self._check(dst.lm.suspend(dst.cntlid), "destination: Migration Send (Suspend)")
        # Log user data changes, then track the guest's memory.
        self.lmq = src.lm.udmq(src.cntlid, slots=self.opt.lmq_slots)
        self._check(src.lm.log_start(self.lmq.cdqid), "source: Track Send (start logging)")
        self._set_stage("logging")
        if self.opt.track_memory:
            self._track_memory(s_info["dma"])

    def _track_memory(self, dma: list[list[int]]) -> None:
        assert self.src.lm is not None
        rmrtg = 0
        while sum(size >> (12 + rmrtg) for _, size in dma) > MAX_TRACKED_GRANULES:
            rmrtg += 1
        g = 1 << (12 + rmrtg)
        ranges = [(iova & ~(g - 1), (iova + size - (iova & ~(g - 1)) + g - 1) // g) for iova, size in dma]
        c = self.src.lm.track_memory(self.src.cntlid, ranges, rmrtg=rmrtg)
        if c.ok:
            self.tracking = True
        else:
            log.warning("source: Track Memory Changes refused (%r); pages will not be reported", c)

    # -- 2. pre-copy ----------------------------------------------------------------------
    def _copy(self, ranges: dict[int, list[Range]]) -> int:
        assert self.copier is not None
        todo = {n: coalesce(r) for n, r in ranges.items()}
        left = sum(total(r) * self.formats[n] for n, r in todo.items())
        done = 0
        t0 = time.monotonic()

        def step(n: int) -> None:
            nonlocal done
            done += n
            rate = done / max(time.monotonic() - t0, 1e-6)
            self.progress.bytes_left = left - done
            self.progress.eta_s = (left - done) / rate if rate else None
            self._emit()
        for nsid, rs in todo.items():
            self.copier.copy(nsid, self.formats[nsid], rs, step)
        return done

    def _allocated(self) -> dict[int, list[Range]]:
        assert self.src.lm is not None
        out = {nsid: self.src.lm.allocated(nsid) for nsid in self.formats}
        return out

    def _precopy(self) -> None:
        """Bulk copy, then rounds of logged changes until a round is small or stops shrinking."""
        alloc = self._allocated()
        self.report.bytes_allocated = sum(total(r) * self.formats[n] for n, r in alloc.items())
        self._copy(alloc)
        prev: int | None = None
        for number in range(1, self.opt.max_rounds + 1):
            t0 = time.monotonic()
            self.progress.round = number
            logged, overflow = self._drain(consume=True)
            if overflow:
                self._overflow(restart=True)
                prev = None
                continue
            size = self._size(logged, self.formats)
            if size:
                copied = self._apply(logged)
                seconds = time.monotonic() - t0
                self.report.round_stats.append(Round(len(self.report.round_stats) + 1, size, copied, seconds))
                self.report.rounds = len(self.report.round_stats)
                self.progress.dirty_rate = size / max(seconds, 1e-6)
            if precopy_done(number, size, prev, self.opt.max_rounds, self.opt.small_bytes):
                break  # small, not shrinking, or the last round: the rest is copied after the suspend
            prev = size

    def _drain(self, consume: bool) -> tuple[dict[int, ChangeSet], bool]:
        """Logged changes by NSID since the last drain, in queue order; whether the queue
        filled (ESA 111b)."""
        assert self.src.lm is not None and self.lmq is not None
        out: dict[int, ChangeSet] = defaultdict(ChangeSet)
        overflow = False
        for e in self.src.lm.drain(self.lmq, consume=consume):
            if e.esa == Esa.LAST_FULL:
                overflow = True
            if e.nsid not in self.formats or e.lbacir not in (Lbacir.RANGE, Lbacir.WHOLE_NAMESPACE):
                continue
            cs = out[e.nsid]
            if e.lbacir == Lbacir.WHOLE_NAMESPACE:  # everything may have changed
                cs.deallocate((0, self.nsze[e.nsid]))
                for r in self._allocated()[e.nsid]:
                    cs.write(r)
                continue
            self.report.bytes_logged += e.nlb * self.formats[e.nsid]
            (cs.deallocate if e.dlba else cs.write)((e.slba, e.nlb))
        return dict(out), overflow

    def _apply(self, changes: dict[int, ChangeSet]) -> int:
        """Deallocate on the destination what was last deallocated, copy what was last
        written; returns the bytes copied."""
        assert self.dst.host is not None
        for nsid, cs in changes.items():
            for i in range(0, len(cs.deallocated), 256):  # Dataset Management: 256 ranges
                c = self.dst.host.deallocate(nsid, split(cs.deallocated[i:i + 256], 0xFFFFFFFF))
                if not c.ok:
                    raise MigrationError(f"destination: deallocate in namespace {nsid} failed: {c!r}")
        return self._copy({nsid: cs.written for nsid, cs in changes.items()})

    @staticmethod
    def _size(changes: dict[int, ChangeSet], formats: dict[int, int]) -> int:
        return sum(total(coalesce(cs.written + cs.deallocated)) * formats[n] for n, cs in changes.items())

    def _overflow(self, restart: bool) -> None:
        """The queue filled and logging stopped, so changes were lost: (restart logging and)
        make the destination match the allocated space again -- deallocate what it holds
        beyond the source's allocation, copy everything allocated."""
        assert self.src.lm is not None and self.dst.lm is not None and self.lmq is not None
        self.report.lmq_overflows += 1
        log.warning("LBA Migration Queue full (ESA 111b): copying the whole allocated space again")
        if restart:
            self._check(self.src.lm.log_start(self.lmq.cdqid), "source: Track Send (restart logging)")
        alloc = self._allocated()
        changes: dict[int, ChangeSet] = {}
        for nsid, rs in alloc.items():
            cs = changes[nsid] = ChangeSet()
            cs.deallocated = subtract(self.dst.lm.allocated(nsid), rs)
            cs.written = rs
        self._apply(changes)

    # -- 3. suspend -------------------------------------------------------------------------
    def _suspend_and_copy(self) -> None:
        src = self.src
        assert src.lm is not None
        self._t_step = self._t_suspend = time.monotonic()
        self._check(src.lm.suspend(src.cntlid, dudmq=True), "source: Migration Send (Suspend)")
        self._step("suspend")
        self._set_stage("suspended")
        self.lmq_deleted = True  # DUDMQ: the ESA 011b marker is posted, then the queue is deleted
        logged, overflow = self._drain(consume=False)
        t0 = time.monotonic()
        size = self._size(logged, self.formats)
        if overflow:  # changes were lost: the whole allocated space supersedes the log
            self._overflow(restart=False)
            copied = 0
        else:
            copied = self._apply(logged)
        self.report.round_stats.append(Round(len(self.report.round_stats) + 1, size, copied, time.monotonic() - t0))
        self.report.rounds = len(self.report.round_stats)
        self.progress.round = self.report.rounds
        self._step("last copy")

    # -- 4./5. state and hand-over -----------------------------------------------------------
    def _switch(self) -> None:
        src, dst = self.src, self.dst
        assert src.lm is not None and dst.lm is not None
        src.call("handover.pause", cntlid=src.cntlid)
        self._step("pause")
        self._set_stage("paused")
        state, _ = src.lm.get_state(src.cntlid, piece=64 << 10)  # one command for a few KiB
        self._step("get state")
        if self.before_switch is not None:
            self.before_switch(self)
            self._step("before_switch hook")
        self._check(dst.lm.set_state(dst.cntlid, state), "destination: Set Controller State")
        self._step("set state")
        assert src.control is not None and dst.control is not None
        result, fds = src.control.call_fds("handover.export", {"cntlid": src.cntlid})
        try:
            dst.control.call("handover.adopt", {"cntlid": dst.cntlid, **result, "source":
                                                {"control": src.control_path, "cntlid": src.cntlid}}, fds)
        finally:
            for fd in fds:
                os.close(fd)
        self._step("hand-over")
        self._set_stage("adopted")
        self._check(dst.lm.resume(dst.cntlid), "destination: Migration Send (Resume)")
        self._step("resume")
        # Committed: at the Resume the destination releases the source's copy of the
        # connection and reads it (its control socket does, even if the MMH dies now).
        self._set_stage("resumed")
        if not dst.call("handover.wait", cntlid=dst.cntlid, timeout=10)["serving"]:
            raise MigrationError("destination does not serve the connection after the commit (see its log)")
        self._step("commit")
        self.report.downtime_ms = (time.monotonic() - self._t_suspend) * 1000
        self._set_stage("done")
        # The suspended source writes no guest memory any more: Track Receive after the switch.
        if self.tracking:
            dirty, _ = src.lm.dirty_ranges(src.cntlid)
            self.report.pages_reported = sum(n for _, n in dirty) // 4096
            src.lm.track_memory_stop(src.cntlid)
            self.tracking = False

    # -- undo ---------------------------------------------------------------------------------
    def _abort(self) -> None:
        reached = _STAGES.index(self.stage)
        src, dst = self.src, self.dst

        def attempt(what: str, fn: Callable[[], Any]) -> None:
            try:
                fn()
            except Exception as e:
                log.warning("cleanup: %s failed: %s", what, e)
        if reached >= _STAGES.index("resumed"):
            return  # committed: the destination finishes the hand-over by itself
        if reached >= _STAGES.index("adopted"):
            attempt("destination discard", lambda: dst.call("handover.discard", cntlid=dst.cntlid))
        if reached >= _STAGES.index("paused"):
            attempt("source unpause", lambda: src.call("handover.unpause", cntlid=src.cntlid))
        if src.lm is not None:
            if self.tracking:
                attempt("stop memory tracking", lambda: src.lm.track_memory_stop(src.cntlid))  # type: ignore[union-attr]
            if reached >= _STAGES.index("suspended"):
                attempt("source resume", lambda: self._check(src.lm.resume(src.cntlid),  # type: ignore[union-attr]
                                                             "source: Resume"))
            if self.lmq is not None and not self.lmq_deleted:
                attempt("delete the LBA Migration Queue",
                        lambda: src.lm.cdq_delete(self.lmq.cdqid))  # type: ignore[union-attr]

    @staticmethod
    def _check(c: Any, what: str) -> Any:
        if not c.ok:
            raise MigrationError(f"{what} failed: {c!r}")
        return c
