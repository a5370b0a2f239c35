"""Plain, serialisable TP4159 state, kept in ``ControllerState.vendor``.

An MMC holds its Controller Data Queues, the host-memory tracking it performs
and any Set Controller State sequence in progress; a migratable controller
holds only who suspended it.  Everything is dataclasses of ints, lists and
bytearrays, so ``ControllerState.to_dict()`` / ``from_dict()`` carry it; the
accessors below turn the dicts that ``from_dict`` leaves back into objects.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from emulator.nvme import fastgen

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller

MMC_KEY = "tp4159_mmc"
TARGET_KEY = "tp4159_target"


@dataclass
class CdqState:
    """One Controller Data Queue of an MMC (Base 2.1 §8.1.6 [2.3 §8.1.7])."""
    cdqid: int
    qt: int  # Queue Type (0h = User Data Migration Queue)
    cntlid: int  # CQS: the migratable controller whose changes are logged
    pages: list[int]  # page addresses (one entry, the base, when PC=1)
    pc: bool
    page_size: int
    size_dw: int  # CDQSIZE
    entry_size: int
    head: int = 0  # slot index, set by the host (Feature 21h HP)
    tail: int = 0  # controller's next slot (never visible to the host)
    phase: int = 1  # CDQP written on this pass
    etpt: bool = False
    tpt: int = 0
    logging: bool = False  # Track Send LUDC started and not stopped/full

    @property
    def slots(self) -> int:
        return self.size_dw * 4 // self.entry_size

    def used(self) -> int:
        return (self.tail - self.head) % self.slots

    def full(self) -> bool:
        """Full when head == tail + 1 (one slot is never used, Base §3.3.1.5)."""
        return self.used() == self.slots - 1

    def empty(self) -> bool:
        return self.head == self.tail

    def slot_address(self, slot: int) -> int:
        off = slot * self.entry_size
        if self.pc:
            return self.pages[0] + off
        return self.pages[off // self.page_size] + off % self.page_size

    def memory_ranges(self) -> int:
        """Number of physically contiguous memory ranges (counted for MCMR/NMCMR)."""
        ranges, prev = 0, None
        for p in self.pages:
            if prev is None or p != prev + self.page_size:
                ranges += 1
            prev = p
        return ranges


@dataclass
class MemTrackState:
    """Track Memory Changes of one target controller (Base §5.1.27.1.2).

    ``dirty`` holds one byte per granule for every descriptor, descriptors in
    the order given; numpy views of it are the dirty bitmaps.
    """
    cntlid: int
    gshift: int  # log2 of the granularity in bytes (12 + RMRTG)
    ranges: list[list[int]]  # [SADDR, LEN in granules], as given by the host
    dirty: bytearray = field(default_factory=bytearray)


@dataclass
class MmcState:
    cdqs: dict[int, CdqState] = field(default_factory=dict)
    tracks: dict[int, MemTrackState] = field(default_factory=dict)  # by target CNTLID
    # Set Controller State pieces received so far, by target CNTLID (SEQIND 01b opened).
    sequences: dict[int, bytearray] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MmcState":
        fastgen.bump()  # restored CDQs: a UDMQ may be logging (the I/O fast path's udlog check)
        return cls(
            cdqs={int(k): CdqState(**v) for k, v in d.get("cdqs", {}).items()},
            tracks={int(k): MemTrackState(**{**v, "dirty": bytearray(v["dirty"])})
                    for k, v in d.get("tracks", {}).items()},
            sequences={int(k): bytearray(v) for k, v in d.get("sequences", {}).items()},
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TargetState:
    """What a migratable controller remembers of TP4159."""
    suspended_by: int = -1  # CNTLID of the MMC whose Migration Send suspended it
    # Clocks read at the suspend (monotonic, wall): a suspended controller's
    # state does not change, so successive Get Controller State pieces agree.
    suspended_at: list[float] = field(default_factory=list)
    # The controller moved to another process (live migration hand-over): it
    # stays suspended for good and refuses Resume.
    released: bool = False
    # Its host connection is paused for a hand-over: a wake (Resume, MMC reset) waits
    # until the hand-over is undone (wake_pending) or becomes a release.
    held: bool = False
    wake_pending: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TargetState":
        return cls(**d)


T = TypeVar("T", MmcState, TargetState)


def _entry(ctrl: "Controller", key: str, cls: type[T]) -> T:
    """The object under ``key`` in ``state.vendor``, rebuilt from a dict if needed."""
    v = ctrl.state.vendor.get(key)
    if not isinstance(v, cls):
        v = cls.from_dict(v) if v else cls()
        ctrl.state.vendor[key] = v
    return v


def mmc_state(ctrl: "Controller") -> MmcState:
    return _entry(ctrl, MMC_KEY, MmcState)


def target_state(ctrl: "Controller") -> TargetState:
    return _entry(ctrl, TARGET_KEY, TargetState)
