"""Track Memory Changes: which host memory a controller wrote by DMA.

Track Send SEL 1h (Base 2.1 §5.1.27.1.2 [2.3 §5.2.28.1.2]) starts or stops
tracking; Track Receive SEL 0h (§5.1.26 [5.2.27]) reports the dirty ranges
and clears them (read-and-clear).  Every store the target controller makes
into host memory goes through ``GuestMemory.views(write=True)``, whose write
observers feed one numpy byte-per-granule bitmap per tracked descriptor:
read data, completion queue entries, identify/log payloads, everything.
MSI-X writes are not memory writes here (vfio-user signals eventfds).
"""
from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Callable

import numpy as np

from emulator.memory import DmaError
from emulator.nvme.migration import wire
from emulator.nvme.migration.model import MemTrackState, mmc_state
from emulator.nvme.migration.targets import migratable, mmc_command, mmcs
from emulator.nvme.spec import (
    AdminOpcode, Command, CommandSpecific, invalid_field, specific,
)
from emulator.nvme.controller import Result

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller

log = logging.getLogger("nvme.lm.memtrack")

# Identify Controller limits (bytes 570-575: CMMRTD, NMMRTD, MINMRTG, MAXMRTG).
# MINMRTG/MAXMRTG use the RMRTG code (2^n x 4 KiB): libnvme documents them as
# "the minimum/maximum value supported in the RMRTG field"; the spec text we
# read gives no other encoding.
CMMRTD = 64  # descriptors one MMC tracks, all targets together
NMMRTD = 256  # ... the whole subsystem
MINMRTG = 0  # 4 KiB
MAXMRTG = 10  # 4 MiB
# Granules one target may have in its bitmaps (one byte each): beyond it the
# controller cannot honour the request: Not Enough Resources with MRTG/NMRTD.
MAX_GRANULES = 1 << 24


def _descriptors(ctrl: "Controller") -> int:
    return sum(len(t.ranges) for t in mmc_state(ctrl).tracks.values())


def track_send_tmc(ctrl: "Controller", cmd: Command) -> Result:
    """Track Send, Track Memory Changes (MOS bit 0 TACT, CDW11 15:0 CNTLID)."""
    tact = wire.mos(cmd.cdw10) & 0x1
    if wire.mos(cmd.cdw10) & ~0x1:
        raise invalid_field("MOS reserved bits set")
    cntlid = cmd.cdw11 & 0xFFFF
    target = migratable(ctrl, cntlid)  # 1Fh, including CNTLID = the MMC itself
    tracks = mmc_state(ctrl).tracks
    if tact != wire.TACT_START:
        if cntlid not in tracks:  # stopping what is not tracked here: 1Fh (our choice)
            raise specific(CommandSpecific.INVALID_CONTROLLER_IDENTIFIER, "not tracked")
        del tracks[cntlid]
        _sync_observer(target)
        return 0, 0
    if target.state.suspended:
        raise specific(CommandSpecific.CONTROLLER_SUSPENDED, f"controller {cntlid}")
    if any(cntlid in mmc_state(m).tracks for m in mmcs(ctrl)):
        raise specific(CommandSpecific.INVALID_CONTROLLER_IDENTIFIER, "already tracked")
    head = ctrl.data_from_host(cmd, wire.TMC_HEADER.size)
    ver, rmrtg, rnmrtd = wire.TMC_HEADER.unpack(head)
    if ver != 0:
        raise invalid_field(f"Track Memory Changes VER {ver}")
    if not MINMRTG <= rmrtg <= MAXMRTG:
        raise invalid_field(f"RMRTG {rmrtg} outside [{MINMRTG}, {MAXMRTG}]")
    if rnmrtd == 0 or _descriptors(ctrl) + rnmrtd > CMMRTD:
        raise invalid_field(f"RNMRTD {rnmrtd}: CMMRTD {CMMRTD} exceeded")
    if sum(_descriptors(m) for m in mmcs(ctrl)) + rnmrtd > NMMRTD:
        raise invalid_field(f"RNMRTD {rnmrtd}: NMMRTD {NMMRTD} exceeded")
    raw = ctrl.data_from_host(cmd, wire.TMC_HEADER.size + rnmrtd * wire.TMC_DESCRIPTOR.size)
    gshift = wire.GRANULE_BASE_SHIFT + rmrtg
    ranges: list[list[int]] = []
    for i in range(rnmrtd):
        saddr, length = wire.TMC_DESCRIPTOR.unpack_from(
            raw, wire.TMC_HEADER.size + i * wire.TMC_DESCRIPTOR.size)
        if saddr & ((1 << gshift) - 1) or length == 0:
            raise invalid_field(f"descriptor {i}: SADDR {saddr:#x} LEN {length}")
        if not _host_memory(target, saddr, length << gshift):
            # A range that is not host memory of the target: Invalid Field
            # (Base 2.1 §5.1.27.1.2 [2.3 §5.2.28.1.2]).
            raise invalid_field(f"descriptor {i}: {saddr:#x}+{length << gshift:#x} "
                                "is not host memory of the controller")
        ranges.append([saddr, length])
    total = sum(n for _, n in ranges)
    if total > MAX_GRANULES:
        # Cannot honour it: DW0 = MRTG, the finest granularity we could do for
        # this list; DW1 = NMRTD, how many descriptors fit at RMRTG.
        raise specific(CommandSpecific.NOT_ENOUGH_RESOURCES, "too many granules",
                       dw0=_finest(ranges, rmrtg), dw1=_fitting(ranges))
    tracks[cntlid] = MemTrackState(cntlid=cntlid, gshift=gshift, ranges=ranges,
                                   dirty=bytearray(total))
    _sync_observer(target)
    log.info("MMC %d: tracking memory writes of controller %d (%d ranges, %d KiB granules)",
             ctrl.cntlid, cntlid, len(ranges), 1 << (gshift - 10))
    return 0, 0


def _host_memory(target: "Controller", addr: int, length: int) -> bool:
    """The whole range lies in memory the target's host mapped for DMA (regions
    without an fd count: they are host memory the controller just cannot reach)."""
    memory = target.memory
    if memory is None:
        return False
    regions = getattr(memory, "regions", None)
    if regions is None:
        try:
            memory.views(addr, length)  # read views: no copy, no write observer
        except DmaError:
            return False
        return True
    pos, end = addr, addr + length
    for r in sorted(regions(), key=lambda r: r.iova):
        if r.iova <= pos < r.iova + r.size:
            pos = r.iova + r.size
            if pos >= end:
                return True
    return False


def _finest(ranges: list[list[int]], rmrtg: int) -> int:
    for g in range(rmrtg, 64):
        if sum(-(-(n << rmrtg) >> g) for _, n in ranges) <= MAX_GRANULES:
            return g
    return 0xFFFF


def _fitting(ranges: list[list[int]]) -> int:
    total = 0
    for i, (_, n) in enumerate(ranges):
        total += n
        if total > MAX_GRANULES:
            return i
    return len(ranges)


@mmc_command(AdminOpcode.TRACK_RECEIVE)
def track_receive(ctrl: "Controller", cmd: Command) -> Result:
    """Track Receive, Tracked Memory Changes (CDW11 CNTLID, CDW12 NUMDL 0's based)."""
    if wire.sel(cmd.cdw10) != wire.TRACK_RECEIVE_SEL_TMC or cmd.cdw10 >> 8:
        raise invalid_field(f"Track Receive CDW10 {cmd.cdw10:#x}")
    cntlid = cmd.cdw11 & 0xFFFF
    target = migratable(ctrl, cntlid)
    t = mmc_state(ctrl).tracks.get(cntlid)
    if t is None:  # the spec's 1Fh case: no tracking of that CNTLID here
        raise specific(CommandSpecific.INVALID_CONTROLLER_IDENTIFIER, "not tracked")
    length = (cmd.cdw12 + 1) * 4
    room = max(0, (length - wire.TRACKED_HEADER.size) // wire.TRACKED_DESCRIPTOR.size)
    runs = dirty_runs(t)
    report = runs[:room]
    # MTR is 0 whenever NTMCD is 0 (Tracked Memory Changes, ATTRB bit 0): a
    # buffer without room for a descriptor reports nothing and clears nothing.
    more = bool(report) and len(runs) > room
    attrb = (wire.ATTRB_MTR if more else 0) | (wire.ATTRB_SUSP if target.state.suspended else 0)
    out = bytearray(wire.TRACKED_HEADER.pack(0, attrb, cntlid, len(report),
                                             t.gshift - wire.GRANULE_BASE_SHIFT))
    for saddr, n, _, _ in report:
        out += wire.TRACKED_DESCRIPTOR.pack(saddr, n)
    ctrl.data_to_host(cmd, bytes(out[:length]), length)
    bits = np.frombuffer(t.dirty, dtype=np.uint8)
    for _, _, lo, hi in report:  # read-and-clear what was reported
        bits[lo:hi] = 0
    return 0, 0


def dirty_runs(t: MemTrackState) -> list[tuple[int, int, int, int]]:
    """Dirty runs as (SADDR, LEN in granules, first, end index into ``dirty``)."""
    bits = np.frombuffer(t.dirty, dtype=np.uint8)
    out: list[tuple[int, int, int, int]] = []
    base = 0
    for saddr, n in t.ranges:
        seg = bits[base:base + n]
        edges = np.flatnonzero(np.diff(np.concatenate(([0], seg != 0, [0])).astype(np.int8)))
        for lo, hi in zip(edges[0::2], edges[1::2]):
            out.append((saddr + (int(lo) << t.gshift), int(hi - lo),
                        base + int(lo), base + int(hi)))
        base += n
    return out


# ------------------------------------------------------------------ DMA observation
def note_write(target: "Controller", addr: int, length: int) -> None:
    """Mark the granules [addr, addr+length) touches in every tracking of ``target``."""
    if length <= 0:
        return
    end = addr + length
    for m in mmcs(target):
        t = mmc_state(m).tracks.get(target.cntlid)
        if t is not None:
            _mark(t, addr, end)
    t = _DMA_LOGS.get(target)
    if t is not None:
        _mark(t, addr, end)


def _mark(t: MemTrackState, addr: int, end: int) -> None:
    bits = np.frombuffer(t.dirty, dtype=np.uint8)
    base = 0
    for saddr, n in t.ranges:
        rend = saddr + (n << t.gshift)
        if addr < rend and end > saddr:
            lo = (max(addr, saddr) - saddr) >> t.gshift
            hi = ((min(end, rend) - saddr - 1) >> t.gshift) + 1
            bits[base + lo:base + hi] = 1
        base += n


# ------------------------------------------------------------------ DMA logging front end
# The vfio-user VMM's dirty page logging (VFIO DMA_LOGGING_START/STOP/REPORT)
# is the same mechanism: one MemTrackState per controller, fed by the same
# write observer; only the front end differs (IOVA ranges and bitmaps
# instead of Track Send/Receive descriptors).
_DMA_LOGS: "weakref.WeakKeyDictionary[Controller, MemTrackState]" = weakref.WeakKeyDictionary()


def dma_log_start(target: "Controller", page_size: int, ranges: list[tuple[int, int]]) -> int:
    """Log the target's DMA writes into ``ranges`` (IOVA, length in bytes); returns the page
    size used: ``page_size`` clamped to the granularities Track Memory Changes supports
    (MINMRTG..MAXMRTG), coarser (up to MAXMRTG) if the ranges would need more than
    MAX_GRANULES; ValueError if even that is not enough."""
    gshift = min(max(page_size.bit_length() - 1, wire.GRANULE_BASE_SHIFT + MINMRTG),
                 wire.GRANULE_BASE_SHIFT + MAXMRTG)

    def descriptors(g: int) -> list[list[int]]:
        return [[iova >> g << g, ((iova + length - 1) >> g) - (iova >> g) + 1] for iova, length in ranges]
    while sum(n for _, n in descriptors(gshift)) > MAX_GRANULES:
        gshift += 1
        if gshift > wire.GRANULE_BASE_SHIFT + MAXMRTG:
            raise ValueError(f"{len(ranges)} ranges need more than {MAX_GRANULES} granules of the largest size")
    rs = descriptors(gshift)
    _DMA_LOGS[target] = MemTrackState(cntlid=target.cntlid, gshift=gshift, ranges=rs,
                                      dirty=bytearray(sum(n for _, n in rs)))
    _sync_observer(target)
    return 1 << gshift


def dma_log_stop(target: "Controller") -> None:
    _DMA_LOGS.pop(target, None)
    _sync_observer(target)


def dma_log_report(target: "Controller", iova: int, length: int, page_size: int) -> bytes:
    """Bitmap of the pages of [iova, iova+length) the target wrote since the last
    report (bit n = page iova + n * page_size, u64 words, little-endian); the
    granules reported are cleared."""
    t = _DMA_LOGS.get(target)
    npages = -(-length // page_size)
    edges = np.zeros(npages + 1, dtype=np.int32)
    if t is not None:
        bits = np.frombuffer(t.dirty, dtype=np.uint8)
        g = 1 << t.gshift
        base = 0
        for saddr, n in t.ranges:
            seg = bits[base:base + n]
            idx = np.flatnonzero(seg)
            if idx.size:
                lo_addr = np.maximum(saddr + (idx.astype(np.int64) << t.gshift), iova)
                hi_addr = np.minimum(saddr + (idx.astype(np.int64) << t.gshift) + g, iova + length)
                keep = hi_addr > lo_addr
                np.add.at(edges, (lo_addr[keep] - iova) // page_size, 1)
                np.add.at(edges, (hi_addr[keep] - 1 - iova) // page_size + 1, -1)
                seg[idx[keep]] = 0  # read-and-clear
            base += n
    pages = np.cumsum(edges[:-1]) > 0
    out = np.packbits(pages, bitorder="little").tobytes()
    return out + bytes(-len(out) % 8)


# One observer per controller (runtime only, like the memory map it sits on).
_OBSERVERS: "weakref.WeakKeyDictionary[Controller, Callable[[int, int], None]]" = \
    weakref.WeakKeyDictionary()


def tracked(target: "Controller") -> bool:
    return target in _DMA_LOGS or any(target.cntlid in mmc_state(m).tracks for m in mmcs(target))


def _observer(target: "Controller") -> Callable[[int, int], None]:
    obs = _OBSERVERS.get(target)
    if obs is None:
        ref = weakref.ref(target)

        def obs(addr: int, length: int) -> None:
            t = ref()
            if t is not None:
                note_write(t, addr, length)
        _OBSERVERS[target] = obs
    return obs


def _sync_observer(target: "Controller") -> None:
    """Keep one write observer on the target's memory while it is tracked."""
    observers = getattr(target.memory, "observers", None)
    if observers is None:
        return
    obs = _observer(target)
    present = obs in observers
    if tracked(target) and not present:
        observers.append(obs)
    elif not tracked(target) and present:
        observers.remove(obs)


def on_memory(target: "Controller") -> None:
    """Controller hook: the target got a new memory map (a client connected)."""
    _sync_observer(target)


def stop_all(mmc: "Controller") -> None:
    """Controller Level Reset of the MMC stops all tracking it performs (§8.1.12)."""
    tracks = mmc_state(mmc).tracks
    cntlids = list(tracks)
    tracks.clear()
    for cntlid in cntlids:
        target = mmc.subsystem.controllers.get(cntlid)
        if target is not None:
            _sync_observer(target)
