"""Migration v2 of one nvme-emu function: the DeviceMigration the vfio-user layer drives.

The vfio-user layer (emulator/vfio_user/migration.py) walks the VFIO state
machine and carries the stream; this side says what each state means for an
NVMe controller behind a PCI function:

* STOP: the controller is suspended as Migration Send Suspend does it (no
  fetch, no interrupts, no DMA; doorbell writes are recorded);
  RUNNING: it is woken as Migration Send Resume does it.
* PRE_COPY (from RUNNING): the stream starts; user data changes are logged
  from now on (the controller's write observer, the hook the LBA Migration
  Queue uses); the first round is the allocated user data (the TP4165
  allocation map that Get LBA Status ATYPE 02h reports), every later round
  the ranges changed since the previous one.  A MIG_DATA_READ shorter than
  asked ends a round; the next read starts the next round.
* STOP_COPY: the controller is stopped; the last changed ranges, then the
  Controller State (what Get Controller State returns, the hand-over's
  state), the PCI function state and END.  From STOP without PRE_COPY the
  whole allocated data comes first.
* RESUMING: sections are checked as they arrive (migstream.StreamParser);
  user data of a verified DATA section is written at once (what it overwrote
  is kept aside, UserDataUndo), nothing else is applied.  RESUMING -> STOP
  verifies the stream is whole, then loads the PCI function state and commits
  the controller state; LBAs the stream never wrote are deallocated (stale
  data of an earlier migration).  A refused or abandoned stream (bad section,
  failed commit, DEVICE_RESET) puts the overwritten user data back: the
  destination is left as it was.
* Namespaces on shared storage: no user data in the stream at all.

Ranges are (SLBA, NLB) and go through the MMH engine's range helpers
(emulator/mmh/ranges.py), as the ranges ``nvme-emu migrate`` copies do.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import tempfile
import threading
import time
from typing import IO, TYPE_CHECKING, Iterator

from emulator.mmh.ranges import Range, coalesce, split
from emulator.nvme.migration import ctrlstate, memtrack
from emulator.nvme.migration.model import target_state
from emulator.nvme.migration.send import wake
from emulator.pci.state import PciFunctionState
from emulator.subsystem.migstream import DATA_HEAD, Kind, StreamError, StreamParser, StreamWriter
from emulator.vfio_user.migration import MigState

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.namespace import Namespace
    from emulator.pci.function import NvmePciFunction

log = logging.getLogger("nvme-emu.devmig")

DATA_CHUNK = 256 << 10  # user data bytes per DATA section
MAX_CHANGES = 1 << 16  # logged writes kept before they are coalesced


class UserDataUndo:
    """What a RESUMING stream overwrote in the namespaces, to put back if the stream is
    refused or abandoned: the old bytes (in a temporary file beside the backing file)
    and which TLBAAG granules were allocated."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._pos = 0
        self._records: list[tuple["Namespace", int, int, int, list[tuple[int, int]]]] = []

    def save(self, ns: "Namespace", slba: int, nlb: int) -> None:
        a = ns.allocation
        runs, _ = a.runs(slba // a.tlbaag, -(-(slba + nlb) // a.tlbaag))
        allocated = [(int(lo), int(hi)) for lo, hi in runs]
        if not allocated:  # nothing there (a fresh destination): undone by deallocating
            self._records.append((ns, slba, nlb, -1, []))
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=ns.path.parent, prefix=".migration-undo-")
        old = bytearray(nlb * ns.lba_size)
        ns.read_into(slba, [memoryview(old)])
        os.pwrite(self._file.fileno(), old, self._pos)
        self._records.append((ns, slba, nlb, self._pos, allocated))
        self._pos += len(old)

    def rollback(self) -> None:
        """Newest first: the old bytes back, then the granules that were not allocated
        deallocated again (the rest of such a granule held nothing before either)."""
        for ns, slba, nlb, pos, allocated in reversed(self._records):
            if pos >= 0:
                assert self._file is not None
                old = bytearray(os.pread(self._file.fileno(), nlb * ns.lba_size, pos))
                ns.write_from(slba, nlb, [memoryview(old)])
            t = ns.allocation.tlbaag
            g = slba // t
            for lo, hi in allocated + [(-(-(slba + nlb) // t), 0)]:
                if lo > g:
                    ns.deallocate(g * t, min(lo * t, ns.nsze) - g * t)
                g = max(g, hi)
        self.discard()

    def discard(self) -> None:
        if self._file is not None:
            # Freeing a large unlinked file takes a while: not during the downtime.
            threading.Thread(target=self._file.close, name="undo-close", daemon=True).start()
        self._file, self._records, self._pos = None, [], 0


class NvmeDeviceMigration:
    def __init__(self, function: "NvmePciFunction", controller: "Controller", shared_storage: bool = False) -> None:
        self.fn = function
        self.ctrl = controller
        self.shared = shared_storage
        self._reset_stream()
        self.stats = {"rounds": 0, "data_bytes": 0, "state_bytes": 0, "stream_bytes": 0}

    def _reset_stream(self) -> None:
        """Drop any stream; a RESUMING stream never committed has its user data undone."""
        undo = getattr(self, "_undo", None)
        if undo is not None:
            undo.rollback()
        self._undo: UserDataUndo | None = None
        self._writer: StreamWriter | None = None
        self._sections: Iterator[bytes] | None = None
        self._buf = bytearray()
        self._round_over = False
        self._changes: list[tuple[int, int, int]] = []  # (nsid, slba, nlb) since the last round
        self._limit = MAX_CHANGES
        self._parser: StreamParser | None = None
        self._pending: tuple[bytes, bytes] | None = None  # (controller state, pci state) received
        self._written: dict[int, list[Range]] = {}
        self._logging_changes(False)

    # -- DeviceMigration --------------------------------------------------------------
    def step(self, cur: MigState, new: MigState) -> None:
        log.info("controller %d: migration state %s -> %s", self.ctrl.cntlid, cur.name, new.name)
        if new == MigState.STOP:
            if cur == MigState.RESUMING:
                self._commit()
            else:
                if cur == MigState.RUNNING:
                    self._stop()
                self._reset_stream()  # from STOP_COPY: the stream is over (or abandoned)
        elif new == MigState.RUNNING:
            if cur == MigState.PRE_COPY:
                self._reset_stream()  # the migration was cancelled: the controller never stopped
            else:
                wake(self.ctrl)
        elif new == MigState.PRE_COPY:
            self._start_stream(precopy=True)
        elif new == MigState.STOP_COPY:
            if cur == MigState.PRE_COPY:
                self._stop()
                self._round_over = False  # the final part drains every change left
                self._sections = self._chain(self._sections, self._final())
            else:
                self._start_stream(precopy=False)
        elif new == MigState.RESUMING:
            self._parser = StreamParser()
            self._written = {}
            self._undo = UserDataUndo()

    def reset(self) -> None:
        self._reset_stream()

    def read(self, size: int) -> bytes:
        if self._round_over and self._sections is not None:
            self._round_over = False
            self._sections = self._chain(self._sections, self._changed_round())
        while len(self._buf) < size and self._sections is not None:
            chunk = next(self._sections, None)
            if chunk is None:
                self._sections = iter(())
                break
            self._buf += chunk
        out = bytes(self._buf[:size])
        del self._buf[:size]
        if len(out) < size:
            self._round_over = True
        self.stats["stream_bytes"] += len(out)
        return out

    def write(self, data: bytes) -> None:
        assert self._parser is not None
        try:
            for kind, body in self._parser.feed(data):  # StreamError (a ValueError) -> EINVAL
                if kind == Kind.DATA:
                    self._apply_data(body)
                elif kind == Kind.CONTROLLER:
                    self._pending = (body, self._pending[1] if self._pending else b"")
                elif kind == Kind.PCI:
                    self._pending = (self._pending[0] if self._pending else b"", body)
        except Exception:
            self._rollback()
            raise

    def _rollback(self) -> None:
        """The stream is refused: what it wrote goes back; later writes are refused too."""
        if self._undo is not None:
            self._undo.rollback()
        self._written = {}
        if self._parser is not None and self._parser.error is None:
            self._parser.error = StreamError("the stream was refused")

    def logging_start(self, page_size: int, ranges: list[tuple[int, int]]) -> int:
        if not ranges:  # num_ranges 0: everything the client mapped
            memory = self.ctrl.memory
            regions = memory.regions() if memory is not None and hasattr(memory, "regions") else []
            ranges = [(r.iova, r.size) for r in regions]
            if not ranges:
                raise ValueError("no DMA map to log")
        return memtrack.dma_log_start(self.ctrl, page_size, ranges)

    def logging_stop(self) -> None:
        memtrack.dma_log_stop(self.ctrl)

    def logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        return memtrack.dma_log_report(self.ctrl, iova, length, page_size)

    # -- source -----------------------------------------------------------------------------
    def _stop(self) -> None:
        c = self.ctrl
        if not c.state.suspended:
            c.state.suspended = True
            target_state(c).suspended_at = [time.monotonic(), time.time()]

    def _start_stream(self, precopy: bool) -> None:
        self._reset_stream()
        self._writer = StreamWriter()
        parts: list[Iterator[bytes]] = [iter((self._writer.header(self.shared),))]
        if not self.shared:
            self._logging_changes(True)
            parts.append(self._data_sections(self._allocated()))
        if not precopy:
            parts.append(self._final())
        self._sections = self._chain(*parts)
        self.stats.update(rounds=1, data_bytes=0, state_bytes=0, stream_bytes=0)

    @staticmethod
    def _chain(*parts: Iterator[bytes] | None) -> Iterator[bytes]:
        for part in parts:
            if part is not None:
                yield from part

    def _logging_changes(self, on: bool) -> None:
        hooks = self.ctrl.observers.on_write
        if on and self._on_write not in hooks:
            hooks.append(self._on_write)
        elif not on and self._on_write in hooks:
            hooks.remove(self._on_write)

    def _on_write(self, ctrl: "Controller", nsid: int, slba: int, nlb: int, deallocated: bool) -> None:
        self._changes.append((nsid, slba, nlb))
        if len(self._changes) >= self._limit:  # nobody reads the rounds (a stalled VMM): coalesce
            self._changes = [(n, a, k) for n, rs in self._take_changes().items() for a, k in rs]
            self._limit = max(MAX_CHANGES, 2 * len(self._changes))  # (bounded by the namespace size)

    def _allocated(self) -> dict[int, list[Range]]:
        out: dict[int, list[Range]] = {}
        for ns in self.ctrl.attached_namespaces():
            a = ns.allocation
            runs, _ = a.runs(0, a.granules)
            out[ns.nsid] = coalesce((int(s) * a.tlbaag, min(int(e) * a.tlbaag, ns.nsze) - int(s) * a.tlbaag)
                                    for s, e in runs)
        return out

    def _take_changes(self) -> dict[int, list[Range]]:
        changes, self._changes = self._changes, []
        out: dict[int, list[Range]] = {}
        for nsid, slba, nlb in changes:
            out.setdefault(nsid, []).append((slba, nlb))
        return {n: coalesce(r) for n, r in out.items()}

    def _changed_round(self) -> Iterator[bytes]:
        changes = self._take_changes()
        if changes:
            self.stats["rounds"] += 1
        return self._data_sections(changes)

    def _data_sections(self, ranges: dict[int, list[Range]]) -> Iterator[bytes]:
        assert self._writer is not None
        for nsid, rs in sorted(ranges.items()):
            ns = self.ctrl.subsystem.namespaces[nsid]
            for slba, nlb in split(rs, max(1, DATA_CHUNK // ns.lba_size)):
                buf = bytearray(DATA_HEAD.size + nlb * ns.lba_size)
                DATA_HEAD.pack_into(buf, 0, nsid, 0, slba)
                ns.read_into(slba, [memoryview(buf)[DATA_HEAD.size:]])
                self.stats["data_bytes"] += nlb * ns.lba_size
                yield self._writer.add(Kind.DATA, buf)

    def _final(self) -> Iterator[bytes]:
        """Stop-copy: the last changed ranges, then the states and END (the controller is stopped)."""
        assert self._writer is not None
        if not self.shared:
            yield from self._changed_round()
            self._logging_changes(False)
        state = ctrlstate.build(self.ctrl, 1, 1)
        pci = json.dumps(self.fn.save_state().to_dict(), separators=(",", ":")).encode()
        self.stats["state_bytes"] = len(state) + len(pci)
        yield self._writer.add(Kind.CONTROLLER, state)
        yield self._writer.add(Kind.PCI, pci)
        yield self._writer.end()

    # -- destination ---------------------------------------------------------------------------
    def _apply_data(self, body: bytes) -> None:
        nsid, _, slba = DATA_HEAD.unpack_from(body)
        ns = self.ctrl.subsystem.namespaces.get(nsid)
        data = memoryview(body)[DATA_HEAD.size:]
        if ns is None or nsid not in self.ctrl.config.nsids or len(data) % ns.lba_size:
            raise ValueError(f"DATA section for namespace {nsid} of {len(data)} bytes")
        nlb = len(data) // ns.lba_size
        if not ns.in_range(slba, nlb):
            raise ValueError(f"DATA section beyond namespace {nsid}: {slba}+{nlb}")
        written = self._written.setdefault(nsid, [])
        if self._undo is not None and not _covers(written, slba, nlb):
            # (LBAs this stream already wrote are put back by that earlier record)
            self._undo.save(ns, slba, nlb)
        ns.write_from(slba, nlb, [data])
        _add(written, slba, nlb)

    def _commit(self) -> None:
        """RESUMING -> STOP: the stream must be whole; then the states (undone if they fail).
        Refused: the user data the stream wrote is put back as well."""
        try:
            saved_pci, state = self._verified()
            self._load(saved_pci, state)
        except Exception:
            self._rollback()
            raise
        if self._undo is not None:
            self._undo.discard()
            self._undo = None
        assert self._parser is not None
        if not self._parser.flags & 1:
            self._deallocate_unwritten()
        self._parser, self._pending = None, None
        log.info("controller %d: migration stream committed", self.ctrl.cntlid)

    def _verified(self) -> tuple[PciFunctionState, bytes]:
        assert self._parser is not None
        self._parser.finish()
        if self._pending is None or not self._pending[0] or not self._pending[1]:
            raise ValueError("the stream has no controller or PCI function state")
        state, pci = self._pending
        try:
            return PciFunctionState.from_dict(json.loads(pci)), state
        except (ValueError, TypeError) as e:
            raise ValueError(f"PCI function state unreadable: {e}") from e

    def _load(self, saved_pci: PciFunctionState, state: bytes) -> None:
        c = self.ctrl
        before_ctrl, before_pci = c.export_state(), self.fn.save_state()
        try:
            self.fn.load_state(saved_pci)
            c.controller_level_reset()
            c.state.suspended = True
            parsed = ctrlstate.parse(c, state, 1, 1)
            ctrlstate.commit(c, parsed)
            target_state(c).released = False
        except Exception as e:
            c.import_state(before_ctrl)
            self.fn.load_state(before_pci)
            raise ValueError(f"controller state refused: {e}") from e

    def _deallocate_unwritten(self) -> None:
        for ns in self.ctrl.attached_namespaces():
            pos = 0
            for slba, nlb in self._written.get(ns.nsid, []) + [(ns.nsze, 0)]:
                if slba > pos:
                    ns.deallocate(pos, slba - pos)
                pos = max(pos, slba + nlb)


# -- sorted, disjoint, non-adjacent (SLBA, NLB) lists -----------------------------------
def _covers(rs: list[Range], slba: int, nlb: int) -> bool:
    i = bisect.bisect_right(rs, (slba, 1 << 64)) - 1
    return i >= 0 and rs[i][0] <= slba and slba + nlb <= rs[i][0] + rs[i][1]


def _add(rs: list[Range], slba: int, nlb: int) -> None:
    """Insert [slba, slba+nlb) and merge what it overlaps or touches."""
    lo = bisect.bisect_left(rs, (slba, 0))
    if lo and rs[lo - 1][0] + rs[lo - 1][1] >= slba:
        lo -= 1
    hi, end = lo, slba + nlb
    while hi < len(rs) and rs[hi][0] <= end:
        hi += 1
    if hi > lo:
        slba = min(slba, rs[lo][0])
        end = max(end, rs[hi - 1][0] + rs[hi - 1][1])
    rs[lo:hi] = [(slba, end - slba)]
