"""A VMM-style vfio-user client that migrates a "VM" between two device instances.

The VM is its RAM (a memfd, :class:`VmRam`) and a guest-like host driver
(:class:`NvmeHost`) whose queues and buffers live in that RAM.  ``Vmm.migrate``
moves it the way a VMM does with VFIO migration v2 (docs/vfio-user-migration.md):

1. destination: connect, VERSION, DMA_MAP of a new RAM memfd, device to
   RESUMING (RUNNING -> STOP -> RESUMING);
2. source: DMA_LOGGING_START on the RAM, device to PRE_COPY; RAM copied
   whole, then rounds: the device's stream is read (MIG_DATA_READ until a
   short reply) and written to the destination (MIG_DATA_WRITE), the pages
   dirtied since the last round --
   by the CPU (the guest driver's stores, tracked by VmRam) and by the device
   (DMA_LOGGING_REPORT) -- copied, and ``guest_step`` runs the guest a while;
   pre-copy ends by the rule ``nvme-emu migrate`` uses (emulator/mmh/plan.py);
3. stop: the guest stops, the source device goes to STOP_COPY; the last
   dirty pages and the rest of the stream are copied; the source goes to STOP
   and the destination to STOP (it verifies and loads the stream), interrupt
   eventfds are given, and it goes to RUNNING;
4. the guest driver continues on the destination with the copied RAM and the
   same queues.

Any failure before the destination runs leaves the source able to go back to
RUNNING (``Vmm.migrate`` does it and re-raises).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from emulator.host.driver import NvmeHost
from emulator.host.memory import DEFAULT_IOVA, PAGE, HostMemory
from emulator.host.transport import VfioUserTransport
from emulator.mmh.plan import precopy_done
from emulator.vfio_user import protocol as p
from emulator.vfio_user.client import VfioUserClient
from emulator.vfio_user.migration import (
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_MIG_DEVICE_STATE,
    LOGGING_HEAD, LOGGING_RANGE, LOGGING_REPORT, MIG_STATE_DATA, MigState,
)
from emulator.vfio_user import messages as m

READ_CHUNK = 512 << 10  # bytes per MIG_DATA_READ (within max_data_xfer_size)


class VmRam(HostMemory):
    """Guest RAM that remembers the pages the CPU (the guest driver) stored to.

    A stand-in for the VMM's own dirty logging (KVM's dirty bitmap).  Reads do
    not dirty; ``buf`` may be written through, so it does."""

    def __init__(self, size: int, iova: int = DEFAULT_IOVA, name: str = "vm-ram") -> None:
        super().__init__(size, iova, name)
        self.cpu_dirty = np.zeros(size // PAGE, dtype=bool)

    def _mark(self, iova: int, length: int) -> None:
        off = iova - self.iova
        self.cpu_dirty[off // PAGE:(off + max(length, 1) - 1) // PAGE + 1] = True

    def alloc(self, size: int, align: int = PAGE) -> int:
        iova = super().alloc(size, align)
        self._mark(iova, size)
        return iova

    def buf(self, iova: int, length: int) -> memoryview:
        self._mark(iova, length)
        return super().buf(iova, length)

    def read(self, iova: int, length: int) -> bytes:
        off = iova - self.iova
        if off < 0 or off + length > self.size:
            raise ValueError(f"IOVA {iova:#x}+{length} outside host memory")
        return bytes(self.view[off:off + length])

    def take_cpu_dirty(self) -> np.ndarray:
        out = self.cpu_dirty.copy()
        self.cpu_dirty[:] = False
        return out

    def adopt_allocator(self, other: HostMemory) -> None:
        """The allocator's bookkeeping is guest state too: it moves with the RAM."""
        self._next, self._free = other._next, {k: list(v) for k, v in other._free.items()}


@dataclass
class MigrationReport:
    rounds: int = 0
    ram_bytes_copied: int = 0
    device_pages_reported: int = 0
    stream_bytes: int = 0
    stream_bytes_stop_copy: int = 0
    downtime_ms: float = 0.0
    total_ms: float = 0.0
    round_sizes: list[int] = field(default_factory=list)


def set_state(client: VfioUserClient, state: MigState) -> None:
    client.device_feature(p.DEVICE_FEATURE_SET | FEATURE_MIG_DEVICE_STATE, MIG_STATE_DATA.pack(state, 0))


def get_state(client: VfioUserClient) -> MigState:
    reply = client.device_feature(p.DEVICE_FEATURE_GET | FEATURE_MIG_DEVICE_STATE, argsz=8 + MIG_STATE_DATA.size)
    return MigState(MIG_STATE_DATA.unpack_from(reply.data)[0])


def read_stream(client: VfioUserClient, sink: Callable[[bytes], None], chunk: int = READ_CHUNK) -> int:
    """MIG_DATA_READ until a reply is shorter than asked; every piece goes to ``sink``."""
    total = 0
    while True:
        data = client.call(m.MigDataReadRequest(chunk)).data
        if data:
            sink(data)
            total += len(data)
        if len(data) < chunk:
            return total


def write_stream(client: VfioUserClient, data: bytes) -> None:
    client.call(m.MigDataWriteRequest(data))


class Vmm:
    """Owns the VM's RAM and its guest driver, attached to the device at ``socket``."""

    def __init__(self, socket: str, ram_bytes: int = 32 << 20, io_queues: int = 1, qsize: int = 64) -> None:
        self.ram = VmRam(ram_bytes)
        self.client = VfioUserClient(socket, timeout=30.0)
        self.host = NvmeHost(VfioUserTransport(self.client, self.ram), self.ram, timeout=30.0)
        self.host.init(io_queues=io_queues, qsize=qsize)

    def close(self) -> None:
        self.host.t.close()
        self.ram.close()

    # -- migration ---------------------------------------------------------------------
    def migrate(self, dest_socket: str, guest_step: Callable[[], None] | None = None, *, max_rounds: int = 10,
                small_bytes: int = 256 << 10,
                before_switch: Callable[[VmRam, VmRam], None] | None = None,
                on_stream: Callable[[bytes, bool], None] | None = None) -> MigrationReport:
        """Move the VM to the device at ``dest_socket``; the guest driver then runs there."""
        made: list[VfioUserTransport] = []

        def interrupts(dst: VfioUserClient, new_ram: VmRam) -> None:
            made.append(VfioUserTransport(dst, new_ram, resumed=True))
        dst, new_ram, rep = migrate_device(self.client, self.ram, dest_socket, guest_step, max_rounds=max_rounds,
                                           small_bytes=small_bytes, before_switch=before_switch,
                                           before_running=interrupts, on_stream=on_stream)
        self.host.t.close()
        self.ram.close()
        self.client, self.ram = dst, new_ram
        self.host.t, self.host.mem = made[0], new_ram
        return rep


def migrate_device(src: VfioUserClient, ram: VmRam, dest_socket: str,
                   guest_step: Callable[[], None] | None = None, *, max_rounds: int = 10,
                   small_bytes: int = 256 << 10, before_switch: Callable[[VmRam, VmRam], None] | None = None,
                   before_running: Callable[[VfioUserClient, VmRam], None] | None = None,
                   precopy_to_destination: bool = True,
                   on_stream: Callable[[bytes, bool], None] | None = None) -> tuple[VfioUserClient, VmRam, MigrationReport]:
    """Migrate the device behind ``src`` (with the VM RAM ``ram`` it DMAs into) to a new
    device at ``dest_socket``; returns the destination client, the new RAM and a report.
    The source is left in STOP.  Device-agnostic: it speaks only VFIO migration v2.

    ``precopy_to_destination`` False reads the pre-copy data and drops it, as
    libvfio-user's sample client does: its sample server's stop-copy data is the
    whole state again, and its destination takes only that.  ``on_stream(data,
    stop_copy)`` sees every piece of the device stream (benchmarks)."""
    rep = MigrationReport()
    t_start = time.monotonic()
    new_ram = VmRam(ram.size, ram.iova, "vm-ram-dest")
    dst = VfioUserClient(dest_socket, timeout=30.0)
    source_stopped = False
    try:
        dst.negotiate()
        dst.dma_map(new_ram.iova, new_ram.size, fd=new_ram.fd, offset=0, flags=3)
        dst.device_info()
        set_state(dst, MigState.RESUMING)

        precopy = True

        def to_dst(data: bytes) -> None:
            rep.stream_bytes += len(data)
            if on_stream is not None:
                on_stream(data, not precopy)
            if precopy_to_destination or not precopy:
                write_stream(dst, data)
        dma_logging(src, ram, True)
        ram.take_cpu_dirty()
        new_ram.view[:] = ram.view  # round 0: the whole RAM
        rep.ram_bytes_copied += ram.size
        set_state(src, MigState.PRE_COPY)
        prev: int | None = None
        while True:
            rep.rounds += 1
            size = read_stream(src, to_dst) + copy_dirty(src, ram, new_ram, rep)
            rep.round_sizes.append(size)
            if guest_step is not None:  # the guest runs on while the VMM copies
                guest_step()
            if precopy_done(rep.rounds, size, prev, max_rounds, small_bytes):
                break
            prev = size
        # Stop-copy: the guest is stopped (no more guest_step), then the device.
        t_stop = time.monotonic()
        set_state(src, MigState.STOP_COPY)
        source_stopped, precopy = True, False
        copy_dirty(src, ram, new_ram, rep)
        before = rep.stream_bytes
        read_stream(src, to_dst)
        rep.stream_bytes_stop_copy = rep.stream_bytes - before
        dma_logging(src, ram, False)
        set_state(dst, MigState.STOP)  # the destination verifies and loads the stream
        new_ram.adopt_allocator(ram)
        if before_switch is not None:
            before_switch(ram, new_ram)
        if before_running is not None:
            before_running(dst, new_ram)
        set_state(dst, MigState.RUNNING)
        rep.downtime_ms = (time.monotonic() - t_stop) * 1000
    except BaseException:
        _undo(src, ram, source_stopped)
        dst.close()
        new_ram.close()
        raise
    # Committed: the source stays stopped; the guest goes on on the destination.
    set_state(src, MigState.STOP)
    rep.total_ms = (time.monotonic() - t_start) * 1000
    return dst, new_ram, rep


def _undo(src: VfioUserClient, ram: VmRam, stopped: bool) -> None:
    """Back to RUNNING on the source (the migration failed before the destination ran)."""
    for step in (lambda: dma_logging(src, ram, False), lambda: set_state(src, MigState.RUNNING)):
        try:
            step()
        except Exception:
            pass


def dma_logging(client: VfioUserClient, ram: VmRam, on: bool, ranged: bool = True) -> None:
    """DMA_LOGGING_START on the whole RAM at 4 KiB pages (``ranged`` False: num_ranges 0,
    everything mapped), or DMA_LOGGING_STOP."""
    if on:
        data = (LOGGING_HEAD.pack(PAGE, 1, 0) + LOGGING_RANGE.pack(ram.iova, ram.size) if ranged
                else LOGGING_HEAD.pack(PAGE, 0, 0))
        reply = client.device_feature(p.DEVICE_FEATURE_SET | FEATURE_DMA_LOGGING_START, data)
        chosen = LOGGING_HEAD.unpack_from(reply.data)[0]
        if chosen != PAGE:
            raise RuntimeError(f"the device logs at {chosen}-byte pages, the VMM copies 4 KiB pages")
        return
    try:
        client.device_feature(p.DEVICE_FEATURE_SET | FEATURE_DMA_LOGGING_STOP, LOGGING_HEAD.pack(PAGE, 0, 0))
    except OSError:
        pass


def copy_dirty(src: VfioUserClient, ram: VmRam, new_ram: VmRam, rep: MigrationReport) -> int:
    """Copy the pages the CPU or the device wrote since the last call; returns the bytes copied."""
    pages = ram.size // PAGE
    argsz = p.DEVICE_FEATURE.size + LOGGING_REPORT.size + 8 * ((pages + 63) // 64)
    reply = src.device_feature(p.DEVICE_FEATURE_GET | FEATURE_DMA_LOGGING_REPORT,
                               LOGGING_REPORT.pack(ram.iova, ram.size, PAGE), argsz)
    bitmap = np.frombuffer(reply.data, dtype=np.uint8, offset=LOGGING_REPORT.size)
    device = np.unpackbits(bitmap, bitorder="little")[:pages].astype(bool)
    device = np.pad(device, (0, pages - len(device)))  # a peer may send a short (even empty) bitmap
    rep.device_pages_reported += int(device.sum())
    dirty = device | ram.take_cpu_dirty()
    idx = np.flatnonzero(np.diff(np.concatenate(([0], dirty.view(np.int8), [0]))))
    copied = 0
    for lo, hi in zip(idx[0::2], idx[1::2]):
        a, b = int(lo) * PAGE, int(hi) * PAGE
        new_ram.view[a:b] = ram.view[a:b]
        copied += b - a
    rep.ram_bytes_copied += copied
    return copied
