"""The configuration model of the subsystem, namespaces and controllers, one class each.

Field names are the YAML keys of ``emulator/subsystem/config.py``, which
validates a file into these objects; every default is stated here, once.
Code that builds a controller or a namespace directly (tests, benchmarks)
uses the same classes.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Optional

CONTROLLER_TYPES = ("io", "mmc")  # migratable I/O controller | Migration Management Controller
# The LBA formats every namespace supports (Identify Namespace LBAF0..NLBAF):
# LBA data sizes in bytes, no metadata.  Format NVM switches between them.
LBA_FORMATS = (512, 4096)
GRANULE_BYTES = 4096  # default TLBAAG x LBA size (TP4165 recommends >= 4 KiB)


def default_tlbaag(lba_size: int) -> int:
    """TLBAAG when none is configured: one tracked granule is GRANULE_BYTES."""
    return max(1, GRANULE_BYTES // lba_size)


@dataclass(frozen=True)
class SubsystemInfo:
    """The NVM subsystem's names (Identify Controller SUBNQN, SN, MN, FR)."""
    nqn: str = "nqn.2026-11.io.nvme-emu:subsys0"
    serial: str = "NVMEEMU0001"
    model: str = "nvme-emu"
    firmware: str = "0.1"
    capacity: int = 0  # TNVMCAP bytes, 0: the namespaces' total size
    max_namespaces: int = 0  # NN/MNAN, 0: the largest nsid


@dataclass(frozen=True)
class NamespaceConfig:
    nsid: int
    file: Path  # sparse backing file
    size: int  # bytes
    lba_size: int = 512
    # Tracked LBA Allocation Granularity in LBAs (NVM CS 1.2 Figure 118);
    # None: default_tlbaag(lba_size).
    tlbaag: Optional[int] = None
    shared: bool = True  # NMIC bit 0: may be attached to two or more controllers
    shared_storage: bool = False  # vfio-user migration v2 streams no user data

    def __post_init__(self) -> None:
        if self.tlbaag is None:
            object.__setattr__(self, "tlbaag", default_tlbaag(self.lba_size))

    @property
    def nlbas(self) -> int:
        return self.size // self.lba_size

    @property
    def flbas(self) -> int:
        """Index of the namespace's LBA format in LBA_FORMATS."""
        return LBA_FORMATS.index(self.lba_size)


@dataclass(frozen=True)
class ControllerConfig:
    cntlid: int
    type: str = "io"  # one of CONTROLLER_TYPES
    namespaces: tuple[int, ...] = ()  # attached NSIDs
    max_io_queues: int = 16  # I/O queue pairs
    mqes: int = 1023  # CAP.MQES, 0's based
    mdts: int = 5  # max transfer 2^mdts x 4 KiB
    msix_vectors: int = 64
    # Doorbell Buffer Config (OACS bit 8): None = on unless this is a migratable
    # controller of a subsystem with an MMC (docs/tp4159.md, shadow doorbells).
    doorbell_buffer: Optional[bool] = None
    # With shadow doorbells: poll a busy SQ's shadow tail (the host does not ring)
    # until this many microseconds pass without a new command; 0 = never poll,
    # every submission rings; None = 1000 where the poll turns run in C, else 0
    # (emulator/nvme/sqpoll.py, sqwait.py, docs/doorbells.md).
    sq_poll_idle_us: Optional[int] = None
    socket: Optional[Path] = None  # where the runtime listens (the controller never looks)

    @property
    def is_mmc(self) -> bool:
        return self.type == "mmc"


def default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (for parsers)."""
    for f in fields(cls):
        if f.name == name and f.default is not MISSING:
            return f.default
    raise KeyError(name)
