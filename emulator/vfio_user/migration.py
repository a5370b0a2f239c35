"""VFIO migration v2 over vfio-user: DEVICE_FEATURE (16), MIG_DATA_READ (17), MIG_DATA_WRITE (18).

The semantics are the kernel VFIO uAPI's (include/uapi/linux/vfio.h,
``VFIO_DEVICE_FEATURE``), which vfio-user carries in messages
(vfio-user protocol 0.9.2, "VFIO_USER_DEVICE_FEATURE" and "VFIO_USER_MIG_DATA_*"):

* flags: feature index in bits 15:0, GET (bit 16), SET (bit 17), PROBE
  (bit 18).  Unknown flag bits, or GET and SET together without PROBE:
  EINVAL.  A feature the device does not have: ENOTTY.  PROBE answers 0
  when every operation asked for (GET/SET) is supported, else EINVAL.
* MIGRATION (1): GET, flags u64 = STOP_COPY | PRE_COPY.
* MIG_DEVICE_STATE (2): GET/SET, device_state u32, data_fd u32 (unused).
  The device walks the kernel's state machine: the direct arcs below, and a
  combination arc is the shortest path through them that passes a saving
  state (PRE_COPY, STOP_COPY, RESUMING) only as its end; STOP_COPY ->
  PRE_COPY is refused.  An invalid arc: EINVAL and the state unchanged.  A
  step the device fails: its errno, and the device is in ERROR (left only
  by DEVICE_RESET, which makes it RUNNING).
* DMA_LOGGING_START (6) / STOP (7): SET; START carries page_size u64,
  num_ranges u32, reserved u32, ranges {iova u64, length u64}; the reply
  echoes it with the page size the device chose.
* DMA_LOGGING_REPORT (8): GET; iova u64, length u64, page_size u64; the
  reply adds the bitmap (u64 words, bit n = page iova + n * page_size) and
  clears what it reported.

This module knows nothing of the device: a backend that migrates exposes a
:class:`DeviceMigration` as its ``migration`` attribute.
"""
from __future__ import annotations

import enum
import errno
from collections import deque
from struct import Struct
from typing import Protocol

from emulator.vfio_user import protocol as p
from emulator.vfio_user.protocol import MessageError


class MigState(enum.IntEnum):
    """enum vfio_device_mig_state."""
    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


# Feature indexes (VFIO_DEVICE_FEATURE_*).
FEATURE_MIGRATION = 1
FEATURE_MIG_DEVICE_STATE = 2
FEATURE_DMA_LOGGING_START = 6
FEATURE_DMA_LOGGING_STOP = 7
FEATURE_DMA_LOGGING_REPORT = 8

# struct vfio_device_feature_migration flags.
MIGRATION_STOP_COPY = 1 << 0
MIGRATION_P2P = 1 << 1
MIGRATION_PRE_COPY = 1 << 2

# Data layouts of the features (after argsz/flags), each declared once.
MIGRATION_DATA = Struct("<Q")  # flags
MIG_STATE_DATA = Struct("<II")  # device_state, data_fd
LOGGING_HEAD = Struct("<QII")  # page_size, num_ranges, reserved
LOGGING_RANGE = Struct("<QQ")  # iova, length
LOGGING_REPORT = Struct("<QQQ")  # iova, length, page_size

# The direct arcs (with PRE_COPY, without P2P).
ARCS: dict[MigState, frozenset[MigState]] = {
    MigState.RUNNING: frozenset({MigState.STOP, MigState.PRE_COPY}),
    MigState.STOP: frozenset({MigState.RUNNING, MigState.STOP_COPY, MigState.RESUMING}),
    MigState.STOP_COPY: frozenset({MigState.STOP}),
    MigState.RESUMING: frozenset({MigState.STOP}),
    MigState.PRE_COPY: frozenset({MigState.RUNNING, MigState.STOP_COPY}),
}
SAVING = frozenset({MigState.PRE_COPY, MigState.STOP_COPY, MigState.RESUMING})
FORBIDDEN = frozenset({(MigState.STOP_COPY, MigState.PRE_COPY)})


def arc_path(cur: int, new: int) -> list[MigState] | None:
    """The states the device goes through from ``cur`` to ``new`` (``new`` last,
    ``cur`` excluded; [] when equal), or None when the uAPI refuses the arc."""
    if cur not in ARCS or new not in ARCS:  # ERROR, P2P states, unknown values
        return None
    cur, new = MigState(cur), MigState(new)
    if cur == new:
        return []
    if (cur, new) in FORBIDDEN:
        return None
    paths: deque[list[MigState]] = deque([[cur]])
    seen = {cur}
    while paths:
        path = paths.popleft()
        for nxt in sorted(ARCS[path[-1]]):
            if nxt == new:
                return path[1:] + [nxt]
            if nxt in seen or nxt in SAVING:
                continue
            seen.add(nxt)
            paths.append(path + [nxt])
    return None


class DeviceMigration(Protocol):
    """What a device implements to migrate (every call runs on the server's loop).

    ``step`` takes the device along one direct arc; raising ValueError (or a
    MessageError with an errno) fails it.  ``read`` returns up to ``size``
    bytes of the stream in PRE_COPY / STOP_COPY (fewer: the end for now);
    ``write`` takes stream bytes in RESUMING.  The DMA logging calls work on
    IOVA ranges at a page size; ``logging_start`` returns the page size used.
    """

    def step(self, cur: MigState, new: MigState) -> None: ...

    def read(self, size: int) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    def reset(self) -> None:
        """DEVICE_RESET: drop any stream; the device is RUNNING again."""
        ...

    def logging_start(self, page_size: int, ranges: list[tuple[int, int]]) -> int: ...

    def logging_stop(self) -> None: ...

    def logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        """The bitmap (bit n = page iova + n * page_size), read-and-clear."""
        ...


def _echo(argsz: int, flags: int, data: bytes) -> tuple[int, int, bytes]:
    return argsz, flags, data


class MigrationFeatures:
    """The DEVICE_FEATURE / MIG_DATA command layer of one device (state kept here)."""

    def __init__(self, device: DeviceMigration | None) -> None:
        self.device = device
        self.state = MigState.RUNNING
        self.logging = False

    # -- DEVICE_FEATURE -------------------------------------------------------------
    def feature(self, argsz: int, flags: int, data: bytes) -> tuple[int, int, bytes]:
        """Run one DEVICE_FEATURE; returns the reply's (argsz, flags, data)."""
        if flags & ~(p.DEVICE_FEATURE_MASK | p.DEVICE_FEATURE_GET | p.DEVICE_FEATURE_SET
                     | p.DEVICE_FEATURE_PROBE):
            raise MessageError(f"DEVICE_FEATURE flags 0x{flags:x}")
        get, set_, probe = (bool(flags & f) for f in (p.DEVICE_FEATURE_GET, p.DEVICE_FEATURE_SET,
                                                      p.DEVICE_FEATURE_PROBE))
        if get and set_ and not probe:  # GET and SET are exclusive except with PROBE
            raise MessageError("DEVICE_FEATURE with GET and SET")
        index = flags & p.DEVICE_FEATURE_MASK
        ops = self._supported(index)
        if ops is None:
            raise MessageError(f"device feature {index} is not supported", errno.ENOTTY)
        if (get and "get" not in ops) or (set_ and "set" not in ops):
            raise MessageError(f"device feature {index}: operation not supported")
        if probe:
            return _echo(argsz, flags, data)
        if not (get or set_):
            raise MessageError(f"device feature {index} without GET, SET or PROBE")
        if index == FEATURE_MIGRATION:
            return self._reply(argsz, flags, MIGRATION_DATA.pack(MIGRATION_STOP_COPY | MIGRATION_PRE_COPY))
        if index == FEATURE_MIG_DEVICE_STATE:
            if get:
                return self._reply(argsz, flags, MIG_STATE_DATA.pack(self.state, 0))
            new, _ = self._unpack(MIG_STATE_DATA, data)
            self.set_state(new)
            return _echo(argsz, flags, MIG_STATE_DATA.pack(self.state, 0))
        if index == FEATURE_DMA_LOGGING_START:
            return _echo(argsz, flags, self._logging_start(data))
        if index == FEATURE_DMA_LOGGING_STOP:
            if not self.logging:
                raise MessageError("DMA logging is not started")
            assert self.device is not None
            self.device.logging_stop()
            self.logging = False
            return _echo(argsz, flags, data)
        return self._report(argsz, flags, data)

    def _supported(self, index: int) -> set[str] | None:
        if self.device is None:
            return None
        return {FEATURE_MIGRATION: {"get"}, FEATURE_MIG_DEVICE_STATE: {"get", "set"},
                FEATURE_DMA_LOGGING_START: {"set"}, FEATURE_DMA_LOGGING_STOP: {"set"},
                FEATURE_DMA_LOGGING_REPORT: {"get"}}.get(index)

    @staticmethod
    def _unpack(layout: Struct, data: bytes) -> tuple[int, ...]:
        if len(data) < layout.size:
            raise MessageError(f"DEVICE_FEATURE data of {len(data)} bytes, expected {layout.size}")
        return layout.unpack_from(data)

    @staticmethod
    def _reply(argsz: int, flags: int, data: bytes) -> tuple[int, int, bytes]:
        need = p.DEVICE_FEATURE.size + len(data)
        if argsz < need:  # the reply must fit the room the client gave
            raise MessageError(f"DEVICE_FEATURE argsz {argsz} < {need}")
        return need, flags, data

    # -- MIG_DEVICE_STATE -------------------------------------------------------------
    def set_state(self, new: int) -> None:
        path = arc_path(self.state, new)
        if path is None:
            name = MigState(new).name if new in MigState._value2member_map_ else str(new)
            raise MessageError(f"migration arc {self.state.name} -> {name} refused")
        assert self.device is not None
        for nxt in path:
            try:
                self.device.step(self.state, nxt)
            except Exception:
                self.state = MigState.ERROR
                raise
            self.state = nxt

    def reset(self) -> None:
        """DEVICE_RESET: the device is RUNNING, any stream dropped (logging stays)."""
        if self.device is not None and self.state != MigState.RUNNING:
            self.device.reset()
        self.state = MigState.RUNNING

    def client_gone(self) -> None:
        """The client disconnected: its DMA logging ends with it (the migration state stays)."""
        if self.logging and self.device is not None:
            self.device.logging_stop()
        self.logging = False

    # -- DMA logging ------------------------------------------------------------------------
    def _logging_start(self, data: bytes) -> bytes:
        page_size, n, _ = self._unpack(LOGGING_HEAD, data)
        if len(data) < LOGGING_HEAD.size + n * LOGGING_RANGE.size:
            raise MessageError(f"DMA_LOGGING_START with {n} ranges and {len(data)} bytes")
        if page_size == 0 or page_size & (page_size - 1):
            raise MessageError(f"DMA logging page size {page_size}")
        if self.logging:
            raise MessageError("DMA logging already started", errno.EBUSY)
        ranges = [LOGGING_RANGE.unpack_from(data, LOGGING_HEAD.size + i * LOGGING_RANGE.size) for i in range(n)]
        for iova, length in ranges:
            if length == 0 or iova + length > 1 << 64:
                raise MessageError(f"DMA logging range 0x{iova:x}+0x{length:x}")
        assert self.device is not None
        chosen = self.device.logging_start(page_size, ranges)
        self.logging = True
        return LOGGING_HEAD.pack(chosen, n, 0) + data[LOGGING_HEAD.size:]

    def _report(self, argsz: int, flags: int, data: bytes) -> tuple[int, int, bytes]:
        iova, length, page_size = self._unpack(LOGGING_REPORT, data)
        if not self.logging:
            raise MessageError("DMA logging is not started")
        if page_size == 0 or page_size & (page_size - 1) or length == 0:
            raise MessageError(f"DMA logging report page size {page_size}, length {length}")
        assert self.device is not None
        words = (-(-length // page_size) + 63) >> 6
        need = p.DEVICE_FEATURE.size + LOGGING_REPORT.size + 8 * words
        if need > p.MAX_DATA_XFER_SIZE:  # the bitmap must fit one reply
            raise MessageError(f"DMA_LOGGING_REPORT of {words * 64} pages: bitmap over one reply")
        if argsz < need:
            raise MessageError(f"DMA_LOGGING_REPORT argsz {argsz} < {need}")
        bitmap = self.device.logging_report(iova, length, page_size)
        return need, flags, data[:LOGGING_REPORT.size] + bitmap.ljust(8 * words, b"\0")

    # -- MIG_DATA ----------------------------------------------------------------------------------
    def read(self, size: int) -> bytes:
        if self.state not in (MigState.PRE_COPY, MigState.STOP_COPY):
            raise MessageError(f"MIG_DATA_READ in state {self.state.name}")
        assert self.device is not None
        return self.device.read(size)

    def write(self, data: bytes) -> None:
        if self.state != MigState.RESUMING:
            raise MessageError(f"MIG_DATA_WRITE in state {self.state.name}")
        assert self.device is not None
        self.device.write(data)
