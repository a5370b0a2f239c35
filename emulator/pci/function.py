"""A PCIe NVMe function: the vfio-user device backend in front of an NVMe controller.

It owns the configuration space, BAR0 (NVMe registers and doorbells forwarded
to the bound :class:`MmioDevice`, then the MSI-X table and PBA) and the
interrupt routing from controller vectors to the client's eventfds.  What QEMU
emulates and what it forwards is in vfio-user-protocol.md §5.

Interrupts (``fire``):

* MSI-X enabled and not function-masked: trigger the vector's eventfd; with no
  eventfd assigned (or function-masked, or no client) the vector's PBA bit is
  set and the interrupt is delivered once the eventfd arrives or the mask
  clears (PCI 3.0 §6.8.2.10).
* MSI-X disabled: INTx with level/automasked semantics (§3.6): a fired INTx
  masks the line until an UNMASK arrives.  The server reports SET_IRQS on the
  INTx index (including a resample-eventfd signal) as ``irqs_changed(0)``; if
  its :class:`IrqLines` has ``masked(index, subindex) -> bool`` that tells a
  MASK from an UNMASK, otherwise every such call counts as an UNMASK.  A fire()
  while masked is remembered and delivered at the UNMASK.

Neither DMA nor interrupts are gated on Bus Master Enable, nor MMIO on Memory
Space Enable: QEMU maps BAR0 from its own view, and test clients need not
program COMMAND.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from emulator.memory import MappedMemory
from emulator.pci import regs as r
from emulator.pci.capabilities import MSIX_CAP_OFFSET, PCIE_CAP_OFFSET, PM_CAP_OFFSET, build_config_space
from emulator.pci.device import MmioDevice
from emulator.pci.ids import (NVME_EMU_DEVICE_ID, NVME_EMU_REVISION_ID, NVME_EMU_SUBSYSTEM_ID,
                              NVME_EMU_SUBSYSTEM_VENDOR_ID, NVME_EMU_VENDOR_ID, PciIdentity)
from emulator.pci.msix import NVME_WINDOW_SIZE, Bar0Layout, MsixTable
from emulator.pci.state import PciFunctionState
from emulator.vfio_user.backend import DeviceInfo, IrqInfo, IrqLines, RegionInfo
from emulator.vfio_user.protocol import (DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, IRQ_INFO_AUTOMASKED,
                                         IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, PCI_BAR0_REGION_INDEX,
                                         PCI_CONFIG_REGION_INDEX, PCI_ERR_IRQ_INDEX, PCI_INTX_IRQ_INDEX,
                                         PCI_MSI_IRQ_INDEX, PCI_MSIX_IRQ_INDEX, PCI_NUM_IRQS,
                                         PCI_NUM_REGIONS, PCI_REQ_IRQ_INDEX, REGION_FLAG_READ,
                                         REGION_FLAG_WRITE)

log = logging.getLogger(__name__)

_RW = REGION_FLAG_READ | REGION_FLAG_WRITE
_MMIO_SIZES = (8, 4, 2, 1)
_MSIX_CTRL = MSIX_CAP_OFFSET + r.PCI_MSIX_FLAGS
_PMCSR = PM_CAP_OFFSET + r.PCI_PM_CTRL
_DEVCTL = PCIE_CAP_OFFSET + r.PCI_EXP_DEVCTL
_MSIX_ENABLE = int(r.PCI_MSIX_FLAGS_ENABLE)
_MSIX_MASKALL = int(r.PCI_MSIX_FLAGS_MASKALL)


def split_access(offset: int, count: int) -> list[tuple[int, int]]:
    """Cut an access into (offset, size) pieces of 1/2/4/8 bytes.

    An access that already is 1/2/4/8 bytes goes through whole (QEMU sends
    guest accesses as they were); any other length is cut into the largest
    naturally aligned pieces, lowest address first.
    """
    if count in _MMIO_SIZES:
        return [(offset, count)]
    pieces: list[tuple[int, int]] = []
    end = offset + count
    while offset < end:
        size = next(s for s in _MMIO_SIZES if s <= end - offset and offset % s == 0)
        pieces.append((offset, size))
        offset += size
    return pieces


class NvmePciFunction:
    """One PCIe NVMe function: a ``DeviceBackend`` and the controller's ``InterruptSink``."""

    def __init__(self, *, vendor_id: int = NVME_EMU_VENDOR_ID, device_id: int = NVME_EMU_DEVICE_ID,
                 subsystem_vendor_id: int = NVME_EMU_SUBSYSTEM_VENDOR_ID,
                 subsystem_id: int = NVME_EMU_SUBSYSTEM_ID, revision_id: int = NVME_EMU_REVISION_ID,
                 msix_vectors: int = 64, device: MmioDevice | None = None) -> None:
        self.identity = PciIdentity(vendor_id, device_id, subsystem_vendor_id, subsystem_id, revision_id)
        self.layout = Bar0Layout(msix_vectors)
        self._defaults = build_config_space(self.identity, self.layout)
        self.config = self._defaults.copy()
        # The MSI-X Message Control word, read on every interrupt: a copy of the config
        # space's, taken again after every change of the config space (_config_changed_locked).
        self._msix_ctrl = self.config.get(_MSIX_CTRL, 2)
        self.msix = MsixTable(msix_vectors)
        self._device = device
        # BAR0 offset -> the device's prepared handler of 4-byte writes there (False: none);
        # filled on first use, emptied when another device is bound (MmioDevice.mmio_writer)
        self._writers: dict[int, Callable[[int], None] | bool] = {}
        self.mig_features: object | None = None  # vfio-user migration v2, set by the subsystem wiring
        self._memory: MappedMemory | None = None
        self._irqs: IrqLines | None = None
        self._lock = threading.RLock()
        self._intx_pending = False  # fired, not yet delivered
        self._intx_asserted = False  # delivered, automasked until UNMASK
        self._intx_client_masked = False

    # -- wiring ------------------------------------------------------------------
    @property
    def device(self) -> MmioDevice | None:
        return self._device

    @property
    def msix_vectors(self) -> int:
        return self.layout.vectors

    @property
    def bar0_size(self) -> int:
        return self.layout.bar_size

    def bind(self, device: MmioDevice) -> None:
        """Attach the NVMe controller behind BAR0."""
        self._device = device
        self._writers.clear()  # the prepared handlers were the previous device's
        if self._memory is not None:
            device.set_memory(self._memory)

    # -- DeviceBackend: description ---------------------------------------------------
    def device_info(self) -> DeviceInfo:
        # §3.2: PCI is mandatory, RESET makes QEMU send DEVICE_RESET.
        return DeviceInfo(DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET, PCI_NUM_REGIONS, PCI_NUM_IRQS)

    def region_info(self, index: int) -> RegionInfo:
        # §3.3: BAR0 trapped (no mmap, so BAR0 writes stay posted); BAR1 is
        # BAR0's upper half; BAR2-5, ROM and VGA absent.
        if index == PCI_BAR0_REGION_INDEX:
            return RegionInfo(_RW, self.layout.bar_size)
        if index == PCI_CONFIG_REGION_INDEX:
            return RegionInfo(_RW, self.config.size)
        if 0 <= index < PCI_NUM_REGIONS:
            return RegionInfo(0, 0)
        raise ValueError(f"no region {index}")

    def irq_info(self, index: int) -> IrqInfo:
        # §3.5: INTx like kernel VFIO; no MSI capability; MSI-X = table size;
        # one ERR line (never signalled: QEMU would stop the VM); no REQ.
        if index == PCI_INTX_IRQ_INDEX:
            return IrqInfo(IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED, 1)
        if index == PCI_MSI_IRQ_INDEX:
            return IrqInfo(IRQ_INFO_EVENTFD, 0)
        if index == PCI_MSIX_IRQ_INDEX:
            return IrqInfo(IRQ_INFO_EVENTFD, self.layout.vectors)
        if index == PCI_ERR_IRQ_INDEX:
            return IrqInfo(IRQ_INFO_EVENTFD, 1)
        if index == PCI_REQ_IRQ_INDEX:
            return IrqInfo(IRQ_INFO_EVENTFD, 0)
        raise ValueError(f"no irq index {index}")

    # -- DeviceBackend: accesses --------------------------------------------------------
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == PCI_CONFIG_REGION_INDEX:
            with self._lock:
                return self.config.read(offset, count)
        if index == PCI_BAR0_REGION_INDEX:
            return self._bar0_access(offset, count, None)
        raise ValueError(f"region {index} is not readable")

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == PCI_CONFIG_REGION_INDEX:
            self._config_write(offset, bytes(data))
        elif index == PCI_BAR0_REGION_INDEX:
            n, device = len(data), self._device
            if n == 4:
                # The hottest path (a doorbell): the device's prepared handler for this offset.
                writer = self._writers.get(offset)
                if writer is None and device is not None and 0 <= offset <= NVME_WINDOW_SIZE - 4:
                    writer = self._prepare_writer(device, offset)
                if writer:
                    writer(int.from_bytes(data, "little"))
                    return
            if (n == 4 or n == 8) and device is not None and 0 <= offset <= NVME_WINDOW_SIZE - n:
                # The hot path (a doorbell): what _bar0_access does for one whole access
                # inside the NVMe window, without building the area list.
                device.mmio_write(offset, n, int.from_bytes(data, "little"))
                return
            self._bar0_access(offset, n, bytes(data))
        else:
            raise ValueError(f"region {index} is not writable")

    def _prepare_writer(self, device: MmioDevice, offset: int) -> Callable[[int], None] | bool:
        """Ask the device once for its handler of 4-byte writes at ``offset`` of the NVMe
        window (its optional ``mmio_writer``); False (kept too) when it has none."""
        ask = getattr(device, "mmio_writer", None)
        writer = (ask(offset, 4) if ask is not None else None) or False
        self._writers[offset] = writer
        return writer

    def _config_write(self, offset: int, data: bytes) -> None:
        with self._lock:
            old_pmcsr = self.config.get(_PMCSR, 2)
            self.config.write(offset, data)
            # PCI PM 1.2 §3.2.4: a write of an unsupported state (D1/D2) is
            # ignored; D3hot -> D0 with No_Soft_Reset keeps all state.
            pmcsr = self.config.get(_PMCSR, 2)
            if (pmcsr & r.PCI_PM_CTRL_STATE_MASK) not in (r.PCI_PM_STATE_D0, r.PCI_PM_STATE_D3HOT):
                self.config.set(_PMCSR, 2, (pmcsr & ~r.PCI_PM_CTRL_STATE_MASK)
                                | (old_pmcsr & r.PCI_PM_CTRL_STATE_MASK))
            # PCIe 4.0 §7.5.3.4: Initiate FLR always reads 0.
            flr = bool(self.config.get(_DEVCTL, 2) & r.PCI_EXP_DEVCTL_BCR_FLR)
            if flr:
                self.config.set_bits(_DEVCTL, 2, r.PCI_EXP_DEVCTL_BCR_FLR, False)
            self._config_changed_locked()
            if not flr:
                self._deliver_pending_locked()
        if flr:
            self.function_level_reset()

    def _config_changed_locked(self) -> None:
        """The config space changed (a write, a reset, a loaded state): refresh what is cached of it."""
        self._msix_ctrl = self.config.get(_MSIX_CTRL, 2)

    def _bar0_access(self, offset: int, count: int, data: bytes | None) -> bytes:
        """Read (``data`` None) or write BAR0, area by area; returns the bytes read."""
        lay = self.layout
        if offset < 0 or count < 0 or offset + count > lay.bar_size:
            raise ValueError(f"BAR0 access 0x{offset:x}+{count} outside 0x{lay.bar_size:x} bytes")
        areas: list[tuple[int, int, Callable[[int, int, bytes | None], bytes]]] = [
            (0, lay.nvme_size, self._nvme_access),
            (lay.table_offset, lay.table_size, self._table_access),
            (lay.pba_offset, lay.pba_size, self._pba_access),
        ]
        out = bytearray(count)
        end = offset + count
        for start, size, access in areas:
            lo, hi = max(offset, start), min(end, start + size)
            if lo < hi:
                part = None if data is None else data[lo - offset:hi - offset]
                out[lo - offset:hi - offset] = access(lo - start, hi - lo, part)
        return bytes(out)  # bytes outside every area read 0, writes are dropped

    def _nvme_access(self, offset: int, count: int, data: bytes | None) -> bytes:
        device = self._device
        out = bytearray()
        for off, size in split_access(offset, count):
            if data is not None:
                if device is not None:
                    chunk = data[off - offset:off - offset + size]
                    device.mmio_write(off, size, int.from_bytes(chunk, "little"))
            else:
                value = device.mmio_read(off, size) if device is not None else 0
                out += (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        return bytes(out) if data is None else bytes(count)

    def _table_access(self, offset: int, count: int, data: bytes | None) -> bytes:
        with self._lock:
            if data is None:
                return self.msix.read_table(offset, count)
            self.msix.write_table(offset, data)
            return bytes(count)

    def _pba_access(self, offset: int, count: int, data: bytes | None) -> bytes:
        # The PBA is read-only (PCI 3.0 §6.8.2.10): writes are dropped.
        with self._lock:
            return self.msix.read_pba(offset, count) if data is None else bytes(count)

    # -- InterruptSink --------------------------------------------------------------------
    def msix_enabled(self) -> bool:
        return bool(self._msix_ctrl & _MSIX_ENABLE)

    def msix_function_masked(self) -> bool:
        return bool(self._msix_ctrl & _MSIX_MASKALL)

    def fire(self, vector: int) -> None:
        with self._lock:
            ctrl = self._msix_ctrl
            if ctrl & _MSIX_ENABLE:
                if not 0 <= vector < self.layout.vectors:
                    log.warning("interrupt on vector %d outside the %d-entry MSI-X table",
                                vector, self.layout.vectors)
                    return
                # what _msix_send_locked does, inline (once per completion batch)
                irqs = self._irqs
                if ctrl & _MSIX_MASKALL or irqs is None or not irqs.trigger(PCI_MSIX_IRQ_INDEX, vector):
                    self.msix.set_pending(vector)
                elif self.msix.pba[vector >> 3]:
                    self.msix.set_pending(vector, False)
            else:
                self._intx_pending = True
                self._intx_deliver_locked()

    def direct_fd(self, vector: int) -> int | None:
        """The eventfd that raises MSI-X ``vector`` as ``fire`` would with nothing else to
        do: MSI-X on and not function-masked, the vector in the table and not pending,
        its line assigned and unmasked; None otherwise.  Valid until the next message."""
        with self._lock:
            ctrl, irqs = self._msix_ctrl, self._irqs
            if (not ctrl & _MSIX_ENABLE or ctrl & _MSIX_MASKALL or irqs is None
                    or not 0 <= vector < self.layout.vectors or self.msix.is_pending(vector)):
                return None
            direct = getattr(irqs, "direct_fd", None)
            return None if direct is None else direct(PCI_MSIX_IRQ_INDEX, vector)

    def _msix_send_locked(self, vector: int) -> bool:
        if self.msix_function_masked() or self._irqs is None:
            return False
        if not self._irqs.trigger(PCI_MSIX_IRQ_INDEX, vector):
            return False
        self.msix.set_pending(vector, False)
        return True

    def _intx_deliver_locked(self) -> None:
        if self.msix_enabled():
            self._intx_pending = False  # INTx is not used while MSI-X is on
        elif (self._intx_pending and not self._intx_asserted and not self._intx_client_masked
              and self.config.get(r.PCI_INTERRUPT_PIN, 1) != 0
              and not self.config.get(r.PCI_COMMAND, 2) & r.PCI_COMMAND_INTX_DISABLE
              and self._irqs is not None and self._irqs.trigger(PCI_INTX_IRQ_INDEX, 0)):
            self._intx_pending = False
            self._intx_asserted = True
        # Status.Interrupt Status mirrors the function's INTx state (PCI 3.0 §6.2.3).
        self.config.set_bits(r.PCI_STATUS, 2, r.PCI_STATUS_INTERRUPT,
                             self._intx_pending or self._intx_asserted)

    def _deliver_pending_locked(self) -> None:
        if self.msix_enabled():
            for vector in self.msix.pending_vectors():
                self._msix_send_locked(vector)
        self._intx_deliver_locked()

    def irqs_changed(self, index: int) -> None:
        with self._lock:
            if index == PCI_INTX_IRQ_INDEX:
                masked = getattr(self._irqs, "masked", None)
                self._intx_client_masked = bool(masked(PCI_INTX_IRQ_INDEX, 0)) if callable(masked) else False
                if not self._intx_client_masked:
                    self._intx_asserted = False  # UNMASK ends the automask
            self._deliver_pending_locked()

    # -- connection ---------------------------------------------------------------------
    def attach(self, memory: MappedMemory, irqs: IrqLines) -> None:
        with self._lock:
            self._memory = memory
            self._irqs = irqs
            self._intx_asserted = self._intx_client_masked = False
        if self._device is not None:
            self._device.set_memory(memory)
        with self._lock:
            self._deliver_pending_locked()

    def dma_mapped(self) -> None:
        """A DMA_MAP arrived: queues that stalled on unmapped memory (a remap) go on."""
        if self._device is not None and self._memory is not None:
            self._device.set_memory(self._memory)

    def detach(self) -> None:
        if self._device is not None:
            self._device.set_memory(None)
        with self._lock:
            self._memory = None
            self._irqs = None
            self._intx_asserted = self._intx_client_masked = False

    # -- resets ---------------------------------------------------------------------
    def reset(self) -> None:
        """DEVICE_RESET (§3.9): conventional reset of the function and its controller."""
        self._reset(keep_flr_bits=False)

    def function_level_reset(self) -> None:
        """Initiate FLR (PCIe 4.0 §6.6.2): like reset() but FLR-exempt bits stay."""
        self._reset(keep_flr_bits=True)

    def _reset(self, keep_flr_bits: bool) -> None:
        with self._lock:
            # COMMAND 0, MSI-X disabled and unmasked, PM D0, BARs 0, INTx idle.
            self.config.reset_to(self._defaults, keep_flr_bits)
            self._config_changed_locked()
            self.msix.reset()
            self._intx_pending = self._intx_asserted = False
        if self._device is not None:
            self._device.function_reset()

    # -- state ---------------------------------------------------------------------
    def save_state(self) -> PciFunctionState:
        with self._lock:
            return PciFunctionState(bytes(self.config.data), bytes(self.msix.table),
                                    bytes(self.msix.pba), self._intx_pending)

    # DeviceBackend: opaque device state for a connection hand-over (the NVMe
    # controller's own state moves by TP4159 Migration Receive / Send).
    def export_device_state(self) -> dict[str, object]:
        return {"pci_function": self.save_state().to_dict()}

    def import_device_state(self, state: dict[str, object]) -> None:
        saved = state.get("pci_function")
        if not isinstance(saved, dict):
            raise ValueError("no PCI function state")
        self.load_state(PciFunctionState.from_dict(saved))

    def load_state(self, state: PciFunctionState) -> None:
        """Restore a saved function; ValueError if it is not this kind of function."""
        if len(state.config) != self.config.size:
            raise ValueError(f"config space is {len(state.config)} bytes, expected {self.config.size}")
        if len(state.msix_table) != len(self.msix.table) or len(state.msix_pba) != len(self.msix.pba):
            raise ValueError("MSI-X table size differs from this function's")
        for off, width in ((r.PCI_VENDOR_ID, 4), (r.PCI_REVISION_ID, 4), (r.PCI_SUBSYSTEM_VENDOR_ID, 4),
                           (_MSIX_CTRL, 2)):
            read_only = ~int.from_bytes(self.config.wmask[off:off + width], "little")
            saved = int.from_bytes(state.config[off:off + width], "little")
            if (saved ^ self._defaults.get(off, width)) & read_only:
                raise ValueError(f"saved function differs from this one at config 0x{off:x}")
        with self._lock:
            self.config.data[:] = state.config
            self._config_changed_locked()
            self.msix.table[:] = state.msix_table
            self.msix.pba[:] = state.msix_pba
            self._intx_pending = state.intx_pending
            self._intx_asserted = False
            self._deliver_pending_locked()
