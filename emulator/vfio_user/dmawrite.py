"""Device writes that the client sees: DMA_WRITE messages instead of stores through the mmap.

The server normally writes guest memory through its own mapping of the guest's
memfd.  QEMU then never learns of the write.  Under TCG that matters: QEMU
drops its translated code for a guest page only when it sees a store to that
page (a vCPU store, or a device write through its memory API).  A page that
held code that ran, refilled by the device, keeps running the *old* code.  A
BIOS boot hits this at once: the MBR runs at 0x7c00 and then reads the
partition's boot sector to 0x7c00 and jumps there (issue 16).

With a :class:`VisibleWrites` channel the controller's stores into chosen
ranges go to the client as DMA_WRITE requests (vfio-user §3.8; QEMU performs
them with ``pci_dma_write``, which invalidates translated code).  To keep the
device's ordering (data, then completion entry, then interrupt) as the guest
sees it:

* once one write goes by message, every later write does too, until all of
  them are acknowledged (so the CQE that follows a read lands after its data);
* interrupts wait until every DMA_WRITE sent before them is acknowledged
  (the eventfd is a separate path and could overtake the socket);
* the device's own reads see its queued and in-flight writes;
* stores the host must see at once (shadow-doorbell EventIdx, ``store_now``)
  bypass the queue: they are not code, and the EventIdx protocol depends on them.

Modes: ``off`` (mmap only), ``boot`` (writes below 1 MiB, the real-mode memory
where BIOS boot code runs; Linux never does DMA there), ``all`` (every write).
This module knows guest memory and interrupt lines, nothing of NVMe.
"""
from __future__ import annotations

import logging
from typing import Callable, Literal

from emulator.memory import MappedMemory, Region, WriteObserver
from emulator.vfio_user import messages as m
from emulator.vfio_user.backend import IrqLines

Mode = Literal["off", "boot", "all"]
MODES: tuple[Mode, ...] = ("off", "boot", "all")
# The default: BIOS boot code below 1 MiB never runs stale translations; Linux does no DMA there.
DEFAULT_MODE: Mode = "boot"
BOOT_LIMIT = 0x100000  # the first MiB: IVT, BDA, 0x7c00, option ROM and BIOS areas


class VisibleWrites:
    """Queues device writes as DMA_WRITE requests and gates interrupts behind their replies.

    ``notify`` is called when requests wait in :meth:`take_requests` (the socket
    layer then sends them and reports the replies to :meth:`acknowledge`).
    """

    def __init__(self, memory: MappedMemory, irqs: IrqLines, mode: Mode, *,
                 notify: Callable[[], None], max_xfer: int, log: logging.Logger | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"visible writes mode {mode!r} (one of {', '.join(MODES)})")
        self.inner = memory
        self.inner_irqs = irqs
        self.mode = mode
        self.notify = notify
        self.max_xfer = max_xfer
        self.log = log or logging.getLogger(__name__)
        self._queued: list[tuple[int, bytearray]] = []      # written by the device, not yet sent
        self._inflight: dict[int, tuple[int, bytes]] = {}   # msg_id -> (address, data) awaiting a reply
        self._sent: list[tuple[m.Message, int, bytes]] = []  # handed out, id not yet known
        self._deferred: list[tuple[int, int]] = []          # interrupts waiting for the replies
        self.stats = {"messages": 0, "bytes": 0, "errors": 0}

    # -- state --------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """Writes queued, sent without a reply yet, or interrupts held back."""
        return bool(self._queued or self._inflight or self._sent)

    def _by_message(self, addr: int, length: int) -> bool:
        if self.mode == "all" or self.pending:
            return True
        return self.mode == "boot" and addr < BOOT_LIMIT

    # -- GuestMemory ----------------------------------------------------------------------
    @property
    def observers(self) -> list[WriteObserver]:
        return self.inner.observers

    def views(self, addr: int, length: int, write: bool = False) -> list[memoryview]:
        direct = self.inner.views(addr, length, write)  # checks the range, tells the observers
        if not length:
            return direct
        if write:
            if not self._by_message(addr, length):
                return direct
            buf = bytearray(length)
            if not self._queued:
                self.notify()
            self._queued.append((addr, buf))
            return [memoryview(buf)]
        if self.pending and self._overlaps(addr, length):
            return [memoryview(self._overlay(addr, self.inner.read(addr, length)))]
        return direct

    def regions(self) -> list[Region]:
        return self.inner.regions()

    def direct(self) -> tuple[MappedMemory, int] | None:
        """For a device fast path (see MappedMemory.direct): the mapped memory and the lowest
        address a device write may store to directly; None while every write goes by message
        (mode ``all``, or writes pending: ordering) or observers watch the writes."""
        if self.mode == "all" or self.pending:
            return None
        inner = self.inner.direct()
        if inner is None:
            return None
        return inner[0], BOOT_LIMIT if self.mode == "boot" else 0

    def read(self, addr: int, length: int) -> bytes:
        data = self.inner.read(addr, length)  # fault-safe copy (see MappedMemory)
        if self.pending and self._overlaps(addr, length):
            return self._overlay(addr, data)
        return data

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        if not self._by_message(addr, len(mv)):
            self.inner.write(addr, mv)  # fault-safe store (see MappedMemory)
            return
        (buf,) = self.views(addr, len(mv), write=True)
        buf[:] = mv  # our own buffer, sent as DMA_WRITE

    def store_now(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Straight through the mapping, even while messages are pending: the shadow-doorbell
        EventIdx protocol needs the host to see it before the device re-reads the doorbells."""
        mv = memoryview(data).cast("B")
        self.inner.write(addr, mv)
        for a, d in self._pieces():  # a pending message over the same bytes would undo it
            if isinstance(d, bytearray):
                lo, hi = max(a, addr), min(a + len(d), addr + len(mv))
                if lo < hi:
                    d[lo - a:hi - a] = mv[lo - addr:hi - addr]

    def _pieces(self) -> list[tuple[int, bytes | bytearray]]:
        return ([(a, d) for _, a, d in self._sent] + list(self._inflight.values()) + list(self._queued))

    def _overlaps(self, addr: int, length: int) -> bool:
        end = addr + length
        return any(a < end and addr < a + len(d) for a, d in self._pieces())

    def _overlay(self, addr: int, data: bytes) -> bytes:
        out = bytearray(data)
        end = addr + len(out)
        for a, d in self._pieces():  # oldest first: later writes win
            lo, hi = max(a, addr), min(a + len(d), end)
            if lo < hi:
                out[lo - addr:hi - addr] = d[lo - a:hi - a]
        return bytes(out)

    # -- IrqLines -----------------------------------------------------------------------
    def trigger(self, index: int, subindex: int) -> bool:
        if not self.pending:
            return self.inner_irqs.trigger(index, subindex)
        if not self.inner_irqs.assigned(index, subindex):
            return False
        if (index, subindex) not in self._deferred:
            self._deferred.append((index, subindex))
        return True

    def assigned(self, index: int, subindex: int) -> bool:
        return self.inner_irqs.assigned(index, subindex)

    def direct_fd(self, index: int, subindex: int) -> int | None:
        return None if self.pending else self.inner_irqs.direct_fd(index, subindex)

    def masked(self, index: int, subindex: int) -> bool:
        return self.inner_irqs.masked(index, subindex)

    # -- the socket side -----------------------------------------------------------------
    def take_requests(self) -> list[m.Message]:
        """DMA_WRITE requests for everything queued, in order, cut at ``max_xfer``.

        Call :meth:`sent` after the codec gave each one its msg_id."""
        out: list[m.Message] = []
        for addr, buf in self._queued:
            data = bytes(buf)
            for off in range(0, len(data), self.max_xfer):
                piece = data[off:off + self.max_xfer]
                msg = m.DmaWriteRequest(addr + off, piece)
                self._sent.append((msg, addr + off, piece))
                out.append(msg)
        self._queued.clear()
        return out

    def sent(self) -> None:
        """The requests from :meth:`take_requests` went out (their msg_ids are set)."""
        for msg, addr, data in self._sent:
            self._inflight[msg.msg_id] = (addr, data)
            self.stats["messages"] += 1
            self.stats["bytes"] += len(data)
        self._sent.clear()

    def acknowledge(self, msg_id: int, error: int = 0) -> bool:
        """A reply to one of our DMA_WRITEs; False if ``msg_id`` is not ours."""
        entry = self._inflight.pop(msg_id, None)
        if entry is None:
            return False
        if error:
            # The client could not write it: store it ourselves so no data is lost
            # (the guest may then run stale translated code, nothing worse).
            self.stats["errors"] += 1
            addr, data = entry
            self.log.warning("DMA_WRITE 0x%x+0x%x refused by the client (errno %d); written through the mmap",
                             addr, len(data), error)
            try:
                self.inner.write(addr, data)
            except Exception as e:  # noqa: BLE001 - the map went away meanwhile
                self.log.warning("DMA_WRITE fallback failed: %s", e)
        self._release()
        return True

    def _release(self) -> None:
        if self.pending:
            return
        deferred, self._deferred = self._deferred, []
        for index, subindex in deferred:
            self.inner_irqs.trigger(index, subindex)

    def drop(self) -> None:
        """The client went away: forget everything in flight."""
        self._queued.clear()
        self._inflight.clear()
        self._sent.clear()
        self._deferred.clear()

