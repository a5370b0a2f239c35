"""One client's session: negotiation, DMA map, interrupt lines, command handling.

No sockets here: :meth:`Session.handle` takes a decoded request and returns
the reply to send (or None), so the whole command layer can be driven and
tested without I/O.  Errors map to errno as follows (§1.2: an ERROR reply is
a bare header with the errno):

* malformed or out-of-range requests, commands before VERSION, a second
  VERSION, MIG_DATA_* outside a migration state: EINVAL;
* a DMA_MAP overlapping an existing map: EEXIST; more than ``max_dma_maps``
  maps (announced in the VERSION reply, default 1024): ENOSPC; an fd that
  cannot be mapped: the mmap errno;
* DEVICE_FEATURE: the kernel VFIO uAPI's errnos (migration.py): ENOTTY for
  a feature the device lacks, EINVAL for bad flags or an invalid arc;
* DMA_UNMAP of a range that matches no map: ENOENT (as libvfio-user);
* dirty-page bitmaps, DIRTY_PAGES, GET_REGION_IO_FDS: ENOTSUP (from the codec);
* the backend raising ValueError: EINVAL; any other exception: logged, EIO.

NO_REPLY requests never get a reply, not even an error one.
"""
from __future__ import annotations

import base64
import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Callable

from emulator.memory import MappedMemory
from emulator.vfio_user import messages as m
from emulator.vfio_user import protocol as p
from emulator.vfio_user.backend import DeviceBackend, IrqInfo, RegionInfo
from emulator.vfio_user.codec import InvalidMessage, close_fds
from emulator.vfio_user.dmawrite import Mode, VisibleWrites
from emulator.vfio_user.irq import IrqTable, Unwatch, Watch
from emulator.vfio_user.migration import MigrationFeatures
from emulator.vfio_user.protocol import MessageError


@dataclass
class HandoverState:
    """What a new owner of a live connection needs besides the socket (all but fds is JSON-able).

    ``dma_maps`` rows are (iova, size, offset, flags, index into ``dma_fds`` or -1);
    ``irq_fds`` rows are (irq index, sub-index, SET_IRQS action, fd);
    ``irq_masks`` rows are (irq index, sub-index, masked, pending);
    ``input`` is what the old owner had read from the socket and not handled yet (part
    of a message) and ``input_fds`` the fds that came with it, as the codec's
    ``export_input`` gives them: (index of the last byte of their read, control data
    truncated, fds).  The fds belong to this object until :meth:`Session.restore` and
    :meth:`take_input` consume them.
    """

    client_caps: dict[str, Any] = field(default_factory=dict)
    dma_maps: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    dma_fds: list[int] = field(default_factory=list)
    irq_fds: list[tuple[int, int, int, int]] = field(default_factory=list)
    irq_masks: list[tuple[int, int, bool, bool]] = field(default_factory=list)
    input: bytes = b""
    input_fds: list[tuple[int, bool, list[int]]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the fds; ``fds()`` lists those in the order ``from_dict`` expects."""
        return {"client_caps": self.client_caps, "dma_maps": [list(r) for r in self.dma_maps],
                "ndma_fds": len(self.dma_fds), "irq_fds": [list(r[:3]) for r in self.irq_fds],
                "irq_masks": [list(r) for r in self.irq_masks], "input": base64.b64encode(self.input).decode(),
                "input_fds": [[last, cut, len(fds)] for last, cut, fds in self.input_fds]}

    def fds(self) -> list[int]:
        return self.dma_fds + [row[3] for row in self.irq_fds] + [fd for _, _, fds in self.input_fds for fd in fds]

    @classmethod
    def from_dict(cls, d: dict[str, Any], fds: list[int]) -> "HandoverState":
        """Inverse of to_dict with the fds received; ValueError (fds closed) if they do not match."""
        try:
            ndma, irqs = int(d["ndma_fds"]), d["irq_fds"]
            counts = [(int(last), bool(cut), int(n)) for last, cut, n in d.get("input_fds", [])]
            nin = sum(n for _, _, n in counts)
            if len(fds) != ndma + len(irqs) + nin or any(n < 0 for _, _, n in counts):
                raise ValueError(f"{len(fds)} fds for {ndma} DMA, {len(irqs)} irq and {nin} buffered fds")
            rest = fds[ndma + len(irqs):]
            input_fds = []
            for last, cut, n in counts:
                input_fds.append((last, cut, rest[:n]))
                rest = rest[n:]
            return cls(dict(d["client_caps"]),
                       [(int(a), int(b), int(c), int(e), int(f)) for a, b, c, e, f in d["dma_maps"]],
                       fds[:ndma], [(int(i), int(s), int(a), fd) for (i, s, a), fd in zip(irqs, fds[ndma:])],
                       [(int(i), int(s), bool(m), bool(p)) for i, s, m, p in d.get("irq_masks", [])],
                       base64.b64decode(d.get("input", ""), validate=True), input_fds)
        except (KeyError, TypeError, ValueError) as e:  # (binascii.Error is a ValueError)
            close_fds(fds)
            raise ValueError(f"malformed session hand-over state: {e}") from e

    def take_input(self) -> tuple[bytes, list[tuple[int, bool, list[int]]]]:
        """The buffered input and its fds (now the caller's)."""
        taken = self.input, self.input_fds
        self.input, self.input_fds = b"", []
        return taken

    def close(self) -> None:
        close_fds(self.fds())
        self.dma_fds, self.irq_fds, self.input_fds = [], [], []


@dataclass
class _DmaMap:
    size: int
    offset: int
    flags: int
    file: tuple[int, int] | None  # (st_dev, st_ino) of the backing fd


def region_info_reply(index: int, info: RegionInfo, room: int, fds_ok: bool = True) -> m.RegionInfoReply:
    """The reply to GET_REGION_INFO with ``room`` bytes of client argsz (§3.3).

    MMAP is reported only with an fd to send; the sparse-mmap cap is included
    when it fits in ``room``, otherwise the reply says how much room it needs.
    """
    flags = info.flags & ~p.REGION_FLAG_CAPS
    fd = info.fd if flags & p.REGION_FLAG_MMAP and fds_ok else None
    if fd is None:
        flags &= ~p.REGION_FLAG_MMAP
    caps = [m.sparse_mmap_cap(info.sparse_areas)] if fd is not None and info.sparse_areas else []
    full = p.REGION_INFO.size + sum(p.REGION_CAP_HEADER.size + len(cap.body) for cap in caps)
    return m.RegionInfoReply(index, flags, info.size, info.offset, caps if full <= room else [], fd, argsz=full)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Session:
    """State and command handlers of one connected client."""

    def __init__(self, backend: DeviceBackend, log: logging.Logger, *, watch: Watch | None = None,
                 unwatch: Unwatch | None = None, max_msg_fds: int = p.MAX_MSG_FDS,
                 max_data_xfer_size: int = p.MAX_DATA_XFER_SIZE,
                 max_dma_maps: int = p.SERVER_MAX_DMA_MAPS, visible_writes: Mode = "off",
                 notify: Callable[[], None] | None = None) -> None:
        self.backend = backend
        self.max_dma_maps = max_dma_maps
        self.log = log
        self.max_msg_fds = max_msg_fds
        self.max_data_xfer_size = max_data_xfer_size
        info = backend.device_info()
        self.num_regions, self.num_irqs = info.num_regions, info.num_irqs
        self.memory = MappedMemory()
        self.irqs = IrqTable([self._irq_info(i) for i in range(info.num_irqs)],
                             watch=watch, unwatch=unwatch, on_change=self._irqs_changed)
        # device writes sent as DMA_WRITE requests (dmawrite.py); ``notify`` asks the socket
        # layer to collect them with take_requests()
        self.visible: VisibleWrites | None = None
        if visible_writes != "off":
            self.visible = VisibleWrites(self.memory, self.irqs, visible_writes, notify=notify or (lambda: None),
                                         max_xfer=max_data_xfer_size, log=log)
        self.negotiated = False
        self.client_caps: dict[str, Any] = {}
        self._client_fds = 1  # fds the client takes per message (spec default)
        self._maps: dict[int, _DmaMap] = {}  # iova -> map
        self._files: dict[tuple[int, int], list[int]] = {}  # (dev, ino) -> [one open fd, maps using it]
        # Migration v2: the backend's DeviceMigration, if it has one; its state lives there.
        self.migration = getattr(backend, "mig_features", None) or MigrationFeatures(None)
        self._handlers: dict[type[m.Message], Callable[[Any], m.Message | None]] = {
            m.VersionRequest: self._version, m.DmaMapRequest: self._dma_map,
            m.DmaUnmapRequest: self._dma_unmap, m.DeviceInfoRequest: self._device_info,
            m.RegionInfoRequest: self._region_info, m.IrqInfoRequest: self._get_irq_info,
            m.SetIrqsRequest: self._set_irqs, m.RegionReadRequest: self._region_read,
            m.RegionWriteRequest: self._region_write, m.RegionWriteMultiRequest: self._region_write_multi,
            m.DeviceResetRequest: self._reset, m.DeviceFeatureRequest: self._device_feature,
            m.MigDataReadRequest: self._mig_data, m.MigDataWriteRequest: self._mig_data,
        }

    def _irq_info(self, index: int) -> IrqInfo:
        try:
            return self.backend.irq_info(index)
        except Exception:
            self.log.exception("irq_info(%d) failed; the index gets no interrupts", index)
            return IrqInfo(0, 0)

    def _irqs_changed(self, index: int) -> None:
        try:
            self.backend.irqs_changed(index)
        except Exception:
            self.log.exception("backend irqs_changed(%d) failed", index)

    # -- life ------------------------------------------------------------------
    def attach(self) -> None:
        if self.visible is not None:
            self.backend.attach(self.visible, self.visible)  # type: ignore[arg-type]  # duck-typed wrappers
        else:
            self.backend.attach(self.memory, self.irqs)

    def take_requests(self) -> list[m.Message]:
        """Requests this server sends the client (DMA_WRITE); call :meth:`requests_sent` after sending."""
        return self.visible.take_requests() if self.visible is not None else []

    def requests_sent(self) -> None:
        if self.visible is not None:
            self.visible.sent()

    @property
    def requests_pending(self) -> bool:
        """DMA_WRITEs queued or awaiting their replies (a hand-over must wait)."""
        return self.visible is not None and self.visible.pending

    def close(self) -> None:
        """The client went away: drop DMA maps and interrupt fds, detach the backend (state stays)."""
        if self.visible is not None:
            self.visible.drop()
        self.memory.clear()
        self._maps.clear()
        close_fds(fd for fd, _ in self._files.values())
        self._files.clear()
        self.irqs.close()
        try:
            self.migration.client_gone()
        except Exception:
            self.log.exception("stopping DMA logging failed")
        try:
            self.backend.detach()
        except Exception:
            self.log.exception("backend detach failed")

    def export(self) -> HandoverState:
        """Duplicate what a new owner of the connection needs (the session stays usable)."""
        files = list(self._files)
        state = HandoverState(dict(self.client_caps), dma_fds=[os.dup(self._files[k][0]) for k in files])
        state.dma_maps = [(iova, r.size, r.offset, r.flags, files.index(r.file) if r.file else -1)
                          for iova, r in self._maps.items()]
        state.irq_fds = [(i, sub, action, os.dup(fd)) for i, sub, action, fd in self.irqs.assignments()]
        state.irq_masks = self.irqs.mask_state()
        return state

    def dma_maps(self) -> list[tuple[int, int]]:
        """(iova, size) of every DMA map, ascending."""
        return sorted((iova, r.size) for iova, r in self._maps.items())

    def restore(self, state: HandoverState) -> None:
        """Take over a negotiated connection's maps and interrupt fds; consumes ``state``'s fds."""
        try:
            self._accept_version(state.client_caps)
            for iova, size, offset, flags, index in state.dma_maps:
                fd = os.dup(state.dma_fds[index]) if index >= 0 else None
                self._dma_map(m.DmaMapRequest(iova, size, flags, offset, fd))
            for index, sub, action, fd in state.irq_fds:
                self.irqs.set_irqs(p.IRQ_SET_DATA_EVENTFD | action, index, sub, 1, [os.dup(fd)])
            self.irqs.restore_masks(state.irq_masks)
        finally:
            state.close()

    # -- dispatch ----------------------------------------------------------------
    def handle(self, msg: m.Message) -> m.Message | None:
        """Run one request; return its reply (an ErrorReply on failure), None for NO_REPLY."""
        if msg.IS_REPLY and self._reply(msg):
            return None
        handler = self._handlers.get(type(msg))
        if handler is None:  # a reply to no request of ours
            self.log.warning("ignoring %s %d", type(msg).__name__, msg.msg_id)
            close_fds(msg.attached_fds())
            return None
        try:
            if not self.negotiated and type(msg) is not m.VersionRequest:
                close_fds(msg.attached_fds())
                raise MessageError(f"{p.command_name(msg.COMMAND)} before VERSION")
            reply = handler(msg)
        except Exception as e:
            err = self._errno(e, msg)
            return None if msg.no_reply else m.ErrorReply(msg.COMMAND, err, msg_id=msg.msg_id)
        if reply is None or msg.no_reply:
            return None
        reply.msg_id = msg.msg_id
        return reply

    def _reply(self, msg: m.Message) -> bool:
        """A reply to a DMA_WRITE this server sent; False if it is not one."""
        if self.visible is None:
            return False
        if isinstance(msg, m.ErrorReply):
            return msg.command == p.Command.DMA_WRITE and self.visible.acknowledge(msg.msg_id, msg.errno or errno.EIO)
        return isinstance(msg, m.DmaWriteReply) and self.visible.acknowledge(msg.msg_id)

    def invalid(self, ev: InvalidMessage) -> m.Message | None:
        """Log a message the codec rejected; the error reply, if one is owed."""
        if ev.is_reply and ev.command == p.Command.DMA_WRITE and self.visible is not None:
            self.visible.acknowledge(ev.msg_id, ev.errno or errno.EIO)
        self.log.warning("%s %d rejected: %s (errno %d)%s", p.command_name(ev.command), ev.msg_id, ev.reason,
                         ev.errno, "" if ev.needs_reply else ", not answered")
        return m.ErrorReply(ev.command, ev.errno, msg_id=ev.msg_id) if ev.needs_reply else None

    def posted_write(self, region: int, offset: int, data: bytes) -> None:
        """A posted REGION_WRITE of 1-8 bytes (the codec's PostedWrite): straight to the
        backend, as :meth:`handle` would, never answered (not even on error)."""
        if not self.negotiated:
            self.log.warning("REGION_WRITE before VERSION ignored")
            return
        try:
            self.backend.region_write(region, offset, data)
        except Exception as e:
            self._log_failure(e, f"posted REGION_WRITE of region {region} at 0x{offset:x}")

    def _errno(self, e: Exception, msg: m.Message) -> int:
        return self._log_failure(e, f"{p.command_name(msg.COMMAND)} {msg.msg_id}")

    def _log_failure(self, e: Exception, what: str) -> int:
        """Log a failed request; its errno."""
        if isinstance(e, MessageError):
            self.log.warning("%s failed: %s (errno %d)", what, e.reason, e.errno)
            return e.errno
        if isinstance(e, ValueError):
            self.log.warning("%s refused by the device: %s", what, e)
            return errno.EINVAL
        self.log.error("%s: device error", what, exc_info=e)
        return errno.EIO

    # -- handlers ---------------------------------------------------------------------
    def _version(self, msg: m.VersionRequest) -> m.Message:
        if self.negotiated:
            raise MessageError("VERSION after negotiation")
        if msg.major != 0:
            raise MessageError(f"client protocol version {msg.major}.{msg.minor}; this server speaks 0.0")
        self._accept_version(msg.capabilities)
        ours: dict[str, Any] = {"max_msg_fds": self.max_msg_fds, "max_data_xfer_size": self.max_data_xfer_size,
                                "pgsizes": p.PGSIZE, "max_dma_maps": self.max_dma_maps, "write_multiple": True}
        # The reply's capabilities are a subset of the proposal's (protocol 0.9.2, VERSION).
        caps = {k: v for k, v in ours.items() if k in msg.capabilities}
        if msg.capabilities.get("write_multiple") is not True:
            caps.pop("write_multiple", None)
        if self.migration.device is not None and isinstance(msg.capabilities.get("migration"), dict):
            caps["migration"] = {"pgsize": p.PGSIZE}  # the device migrates (DEVICE_FEATURE 16)
        return m.VersionReply(0, 0, caps)

    def _accept_version(self, caps: dict[str, Any]) -> None:
        fds, xfer = caps.get("max_msg_fds", 1), caps.get("max_data_xfer_size", p.MAX_DATA_XFER_SIZE)
        pgsizes, multi = caps.get("pgsizes", p.PGSIZE), caps.get("write_multiple", False)
        if not (_is_int(fds) and 0 <= fds <= 1024):
            raise MessageError(f"client max_msg_fds {fds!r}")
        if not (_is_int(xfer) and xfer > 0):
            raise MessageError(f"client max_data_xfer_size {xfer!r}")
        if not (_is_int(pgsizes) and pgsizes & p.PGSIZE):
            raise MessageError(f"client pgsizes {pgsizes!r} lack 4 KiB")
        if not isinstance(multi, bool):
            raise MessageError(f"client write_multiple {multi!r}")
        self.client_caps, self._client_fds, self.negotiated = caps, fds, True
        if self.visible is not None:
            self.visible.max_xfer = min(self.max_data_xfer_size, xfer)

    def _dma_map(self, msg: m.DmaMapRequest) -> m.Message:
        fd = msg.fd
        self.log.debug("DMA_MAP 0x%x+0x%x offset 0x%x flags 0x%x%s", msg.iova, msg.size, msg.offset,
                       msg.flags, "" if fd is not None else " (no fd)")
        try:
            if msg.flags & ~p.DMA_MAP_FLAGS_KNOWN:
                raise MessageError(f"DMA_MAP flags 0x{msg.flags:x}")
            if msg.size == 0 or msg.iova + msg.size > 1 << 64:
                raise MessageError(f"DMA_MAP of 0x{msg.iova:x}+0x{msg.size:x}")
            if len(self._maps) >= self.max_dma_maps:
                raise MessageError(f"more than max_dma_maps ({self.max_dma_maps}) DMA maps", errno.ENOSPC)
            key = None
            if fd is not None:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size < msg.offset + msg.size:
                    # mmap would succeed and the first access past the end would SIGBUS us
                    raise MessageError(f"DMA_MAP past the end of its {st.st_size}-byte file")
                key = (st.st_dev, st.st_ino)
            try:
                region = self.memory.add(msg.iova, msg.size, fd, msg.offset,
                                         writable=bool(msg.flags & p.DMA_FLAG_WRITE))
                if region.guarded:
                    self.log.info("DMA_MAP 0x%x+0x%x: its file is not sealed against shrinking; controller "
                                  "accesses go through the kernel (slower, but safe)", msg.iova, msg.size)
            except FileExistsError:
                raise MessageError(f"DMA_MAP 0x{msg.iova:x}+0x{msg.size:x} overlaps a map", errno.EEXIST) from None
            except OSError as e:
                raise MessageError(f"DMA_MAP cannot map the fd: {e}", e.errno or errno.EINVAL) from None
            self._maps[msg.iova] = _DmaMap(msg.size, msg.offset, msg.flags, key)
            if key is not None and fd is not None:
                # keep one fd per backing file (a connection hand-over needs it), close the dups
                kept = self._files.setdefault(key, [fd, 0])
                kept[1] += 1
                if kept[0] == fd:
                    fd = None
        finally:
            if fd is not None:
                close_fds((fd,))
        mapped = getattr(self.backend, "dma_mapped", None)
        if callable(mapped):  # the device retries what waited for unmapped memory
            mapped()
        return m.DmaMapReply()

    def _unmap(self, iova: int) -> None:
        record = self._maps.pop(iova)
        kept = self._files.get(record.file) if record.file else None
        if kept is not None:
            kept[1] -= 1
            if not kept[1]:
                close_fds((kept[0],))
                del self._files[record.file]  # type: ignore[arg-type]

    def _unmap_range(self, start: int, end: int) -> None:
        """Forget the maps inside [start, end); keep the outside parts of maps it cuts (as memory does)."""
        for iova, record in sorted(self._maps.items()):
            stop = iova + record.size
            if stop <= start or iova >= end:
                continue
            pieces = [(a, b) for a, b in ((iova, min(stop, start)), (max(iova, end), stop)) if a < b]
            for a, b in pieces:  # each piece holds the backing file too
                self._maps[a] = _DmaMap(b - a, record.offset + (a - iova), record.flags, record.file)
                kept = self._files.get(record.file) if record.file else None
                if kept is not None:
                    kept[1] += 1
            if iova not in dict(pieces):
                self._unmap(iova)
            else:  # the head piece replaced the record in place: drop the old record's file use
                kept = self._files.get(record.file) if record.file else None
                if kept is not None:
                    kept[1] -= 1

    def _dma_unmap(self, msg: m.DmaUnmapRequest) -> m.Message:
        self.log.debug("DMA_UNMAP 0x%x+0x%x flags 0x%x", msg.iova, msg.size, msg.flags)
        if msg.flags & ~p.DMA_UNMAP_ALL:
            raise MessageError(f"DMA_UNMAP flags 0x{msg.flags:x}")
        if msg.flags & p.DMA_UNMAP_ALL:
            if msg.iova or msg.size:
                raise MessageError("DMA_UNMAP_ALL with an address or size")
            self.memory.clear()
            for iova in list(self._maps):
                self._unmap(iova)
        elif self.memory.remove(msg.iova, msg.size):
            self._unmap_range(msg.iova, msg.iova + msg.size)
        else:  # it must match a previous map (protocol 0.9.2, DMA_UNMAP)
            raise MessageError(f"DMA_UNMAP of 0x{msg.iova:x}+0x{msg.size:x}: no such map", errno.ENOENT)
        return m.DmaUnmapReply(msg.iova, msg.size, msg.flags, msg.argsz)

    def _device_info(self, msg: m.DeviceInfoRequest) -> m.Message:
        info = self.backend.device_info()
        return m.DeviceInfoReply(info.flags, info.num_regions, info.num_irqs)

    def _region_info(self, msg: m.RegionInfoRequest) -> m.Message:
        if not 0 <= msg.index < self.num_regions:
            raise MessageError(f"no region {msg.index}")
        return region_info_reply(msg.index, self.backend.region_info(msg.index), msg.argsz, self._client_fds >= 1)

    def _get_irq_info(self, msg: m.IrqInfoRequest) -> m.Message:
        if not 0 <= msg.index < self.num_irqs:
            raise MessageError(f"no irq index {msg.index}")
        info = self.backend.irq_info(msg.index)
        return m.IrqInfoReply(msg.index, info.flags, info.count)

    def _set_irqs(self, msg: m.SetIrqsRequest) -> m.Message:
        self.irqs.set_irqs(msg.flags, msg.index, msg.start, msg.count, msg.fds, msg.data)
        return m.SetIrqsReply()

    def _region_read(self, msg: m.RegionReadRequest) -> m.Message:
        if msg.count > self.max_data_xfer_size:
            raise MessageError(f"REGION_READ of {msg.count} bytes")
        data = self.backend.region_read(msg.region, msg.offset, msg.count)
        if len(data) != msg.count:
            raise MessageError(f"device returned {len(data)} of {msg.count} bytes", errno.EIO)
        return m.RegionReadReply(msg.region, msg.offset, data)

    def _region_write(self, msg: m.RegionWriteRequest) -> m.Message | None:
        if len(msg.data) > self.max_data_xfer_size:
            raise MessageError(f"REGION_WRITE of {len(msg.data)} bytes")
        self.backend.region_write(msg.region, msg.offset, msg.data)
        return None if msg.no_reply else m.RegionWriteReply(msg.region, msg.offset, len(msg.data))

    def _region_write_multi(self, msg: m.RegionWriteMultiRequest) -> m.Message:
        failed = 0
        for region, offset, data in msg.writes:  # apply all, in order, like posted writes
            try:
                self.backend.region_write(region, offset, data)
            except Exception as e:
                failed = failed or self._errno(e, msg)
        if failed:
            raise MessageError("a write of REGION_WRITE_MULTI failed", failed)
        return m.RegionWriteMultiReply(len(msg.writes))

    def _reset(self, msg: m.DeviceResetRequest) -> m.Message:
        self.migration.reset()
        self.backend.reset()
        return m.DeviceResetReply()

    def _device_feature(self, msg: m.DeviceFeatureRequest) -> m.Message:
        self.log.info("DEVICE_FEATURE %d: feature %d, flags 0x%x, argsz %d", msg.msg_id,
                      msg.flags & p.DEVICE_FEATURE_MASK, msg.flags >> 16, msg.argsz)
        argsz, flags, data = self.migration.feature(msg.argsz, msg.flags, msg.data)
        return m.DeviceFeatureReply(flags, data, argsz)

    def _mig_data(self, msg: m.Message) -> m.Message:
        if isinstance(msg, m.MigDataReadRequest):
            if msg.size > self.max_data_xfer_size:
                raise MessageError(f"MIG_DATA_READ of {msg.size} bytes")
            return m.MigDataReadReply(self.migration.read(msg.size))
        assert isinstance(msg, m.MigDataWriteRequest)
        self.migration.write(msg.data)
        return m.MigDataWriteReply()
