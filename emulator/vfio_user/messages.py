"""Typed vfio-user messages: one dataclass per request and per reply.

A message knows its payload only (the 16-byte header is the codec's):
``parts()`` gives the encoded payload as a tuple of buffers, ``decode()``
builds the message from a payload and the fds that came with it and raises
:class:`MessageError` (with an errno, EINVAL unless said otherwise) for any
payload that does not fit the layout, including an ``argsz`` smaller than the
fixed part.  Decoding checks structure only; limits that depend on
negotiation (transfer sizes, index ranges) are the server's business.

Layouts are the spec's (vfio-user-protocol.md §2-§3); field names follow it.
"""
from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field
from struct import Struct
from typing import Any, ClassVar, Self

from emulator.vfio_user import protocol as p
from emulator.vfio_user.caps import (RegionCap, chain_size, decode_chain, encode_chain, parse_sparse_mmap,  # noqa: F401
                                     sparse_mmap_cap)  # RegionCap and sparse_mmap_cap re-exported
from emulator.vfio_user.protocol import Buffer, Command, MessageError


def _size_error(name: str, got: int, want: int, exact: bool) -> MessageError:
    return MessageError(f"{name}: {got}-byte payload, expected {'' if exact else 'at least '}{want}")


@dataclass(slots=True)
class Message:
    """Base: a payload-less message.  ``msg_id`` -1 means "codec picks one"."""

    COMMAND: ClassVar[int] = 0
    IS_REPLY: ClassVar[bool] = False
    MAX_FDS: ClassVar[int] = 0  # fds this message may carry

    msg_id: int = field(default=-1, kw_only=True)
    no_reply: bool = field(default=False, kw_only=True)  # requests only: header flag NO_REPLY

    def parts(self) -> tuple[Buffer, ...]:
        return ()

    def attached_fds(self) -> list[int]:
        return []

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        if len(payload):
            raise _size_error(cls.__name__, len(payload), 0, True)
        return cls()


@dataclass(slots=True)
class _Fixed(Message):
    """A payload made of one fixed layout (``FIELDS`` names its fields in wire order)."""

    LAYOUT: ClassVar[Struct]
    FIELDS: ClassVar[tuple[str, ...]]

    def _head(self, *extra: int) -> bytes:
        return self.LAYOUT.pack(*[getattr(self, name) for name in self.FIELDS], *extra)

    def parts(self) -> tuple[Buffer, ...]:
        return (self._head(),)

    @classmethod
    def _fields(cls, payload: memoryview, exact: bool = True) -> tuple[dict[str, Any], tuple[int, ...]]:
        size = cls.LAYOUT.size
        if len(payload) < size or (exact and len(payload) != size):
            raise _size_error(cls.__name__, len(payload), size, exact)
        values = cls.LAYOUT.unpack_from(payload)
        kw = dict(zip(cls.FIELDS, values))
        if kw.get("argsz", size) < size:
            raise MessageError(f"{cls.__name__}: argsz {kw['argsz']} is smaller than {size}")
        return kw, values

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        return cls(**cls._fields(payload)[0])


@dataclass(slots=True)
class _Counted(_Fixed):
    """A layout whose last field counts the ``data`` bytes that follow it."""

    def parts(self) -> tuple[Buffer, ...]:
        data: Buffer = getattr(self, "data")
        return (self._head(len(data)), data)

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        kw, values = cls._fields(payload, exact=False)
        data = payload[cls.LAYOUT.size:]
        if values[-1] != len(data):
            raise MessageError(f"{cls.__name__}: count {values[-1]} but {len(data)} data bytes")
        return cls(**kw, data=bytes(data))  # type: ignore[call-arg]  # subclasses declare ``data``


# -- VERSION (§2) -----------------------------------------------------------------------
@dataclass(slots=True)
class _Version(Message):
    COMMAND = Command.VERSION
    major: int = 0
    minor: int = 0
    capabilities: dict[str, Any] = field(default_factory=dict)  # the "capabilities" object

    def parts(self) -> tuple[Buffer, ...]:
        text = json.dumps({"capabilities": self.capabilities}, separators=(",", ":")).encode()
        return (p.VERSION.pack(self.major, self.minor), text, b"\0")

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        head = p.VERSION.size
        if len(payload) < head:
            raise _size_error(cls.__name__, len(payload), head, False)
        major, minor = p.VERSION.unpack_from(payload)
        caps: Any = {}
        if len(payload) > head:
            if payload[-1] != 0:
                raise MessageError("VERSION: JSON is not NUL-terminated")
            try:
                doc = json.loads(bytes(payload[head:-1]).decode("utf-8"))
            except (ValueError, RecursionError) as e:
                raise MessageError(f"VERSION: bad JSON ({type(e).__name__})") from None
            caps = doc.get("capabilities", {}) if isinstance(doc, dict) else None
            if not isinstance(caps, dict):
                raise MessageError("VERSION: capabilities is not a JSON object")
        return cls(major, minor, caps)


@dataclass(slots=True)
class VersionRequest(_Version):
    pass


@dataclass(slots=True)
class VersionReply(_Version):
    IS_REPLY = True


# -- DMA_MAP / DMA_UNMAP (§3.1) ----------------------------------------------------------------
@dataclass(slots=True)
class DmaMapRequest(_Fixed):
    COMMAND = Command.DMA_MAP
    MAX_FDS = 1
    LAYOUT = p.DMA_MAP
    FIELDS = ("argsz", "flags", "offset", "iova", "size")
    iova: int
    size: int
    flags: int = p.DMA_FLAG_READ | p.DMA_FLAG_WRITE
    offset: int = 0  # offset of the range inside ``fd``
    fd: int | None = None
    argsz: int = p.DMA_MAP.size

    def attached_fds(self) -> list[int]:
        return [] if self.fd is None else [self.fd]

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        return cls(**cls._fields(payload)[0], fd=fds[0] if fds else None)


@dataclass(slots=True)
class DmaMapReply(Message):
    COMMAND = Command.DMA_MAP
    IS_REPLY = True


@dataclass(slots=True)
class _DmaUnmap(_Fixed):
    COMMAND = Command.DMA_UNMAP
    LAYOUT = p.DMA_UNMAP
    FIELDS = ("argsz", "flags", "iova", "size")
    iova: int = 0
    size: int = 0
    flags: int = 0
    argsz: int = p.DMA_UNMAP.size


@dataclass(slots=True)
class DmaUnmapRequest(_DmaUnmap):
    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        if int.from_bytes(payload[4:8], "little") & p.DMA_UNMAP_GET_DIRTY_BITMAP:
            raise MessageError("DMA_UNMAP: dirty bitmaps are not supported", errno.ENOTSUP)
        return cls(**cls._fields(payload)[0])


@dataclass(slots=True)
class DmaUnmapReply(_DmaUnmap):
    """The spec echoes the request payload; an empty payload is accepted too (argsz 0)."""

    IS_REPLY = True

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        return cls(argsz=0) if not len(payload) else cls(**cls._fields(payload)[0])


# -- DEVICE_GET_INFO (§3.2), DEVICE_GET_IRQ_INFO (§3.5) ---------------------------------------
@dataclass(slots=True)
class _DeviceInfo(_Fixed):
    COMMAND = Command.DEVICE_GET_INFO
    LAYOUT = p.DEVICE_INFO
    FIELDS = ("argsz", "flags", "num_regions", "num_irqs")
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0
    argsz: int = p.DEVICE_INFO.size


@dataclass(slots=True)
class DeviceInfoRequest(_DeviceInfo):
    pass


@dataclass(slots=True)
class DeviceInfoReply(_DeviceInfo):
    IS_REPLY = True


@dataclass(slots=True)
class _IrqInfo(_Fixed):
    COMMAND = Command.DEVICE_GET_IRQ_INFO
    LAYOUT = p.IRQ_INFO
    FIELDS = ("argsz", "flags", "index", "count")
    index: int = 0
    flags: int = 0
    count: int = 0
    argsz: int = p.IRQ_INFO.size


@dataclass(slots=True)
class IrqInfoRequest(_IrqInfo):
    pass


@dataclass(slots=True)
class IrqInfoReply(_IrqInfo):
    IS_REPLY = True


# -- DEVICE_GET_REGION_INFO (§3.3) ---------------------------------------------------------------
@dataclass(slots=True)
class RegionInfoRequest(_Fixed):
    COMMAND = Command.DEVICE_GET_REGION_INFO
    LAYOUT = p.REGION_INFO
    FIELDS = ("argsz", "flags", "index", "cap_offset", "size", "offset")
    index: int
    argsz: int = p.REGION_INFO.size  # room the client has for the reply payload
    flags: int = 0
    cap_offset: int = 0
    size: int = 0
    offset: int = 0


@dataclass(slots=True)
class RegionInfoReply(Message):
    """Region info and its capability chain.

    Encoding sets the CAPS flag and ``cap_offset`` from ``caps``; ``argsz`` is
    the full size the reply needs (0: exactly what this message holds).  A
    reply truncated to a small client ``argsz`` carries no caps and a bigger
    ``argsz`` (§3.3).
    """

    COMMAND = Command.DEVICE_GET_REGION_INFO
    IS_REPLY = True
    MAX_FDS = 1
    index: int
    flags: int
    size: int
    offset: int = 0
    caps: list[RegionCap] = field(default_factory=list)
    fd: int | None = None
    argsz: int = 0

    @property
    def sparse_areas(self) -> list[tuple[int, int]] | None:
        for cap in self.caps:
            if cap.id == p.REGION_CAP_SPARSE_MMAP:
                return parse_sparse_mmap(cap.body)
        return None

    def attached_fds(self) -> list[int]:
        return [] if self.fd is None else [self.fd]

    def parts(self) -> tuple[Buffer, ...]:
        head = p.REGION_INFO.size
        flags, cap_offset = ((self.flags | p.REGION_FLAG_CAPS, head) if self.caps
                             else (self.flags & ~p.REGION_FLAG_CAPS, 0))
        return (p.REGION_INFO.pack(self.argsz or head + chain_size(self.caps), flags, self.index, cap_offset,
                                   self.size, self.offset), *encode_chain(self.caps, head))

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        head = p.REGION_INFO.size
        if len(payload) < head:
            raise _size_error(cls.__name__, len(payload), head, False)
        argsz, flags, index, cap_offset, size, offset = p.REGION_INFO.unpack_from(payload)
        if argsz < head:
            raise MessageError(f"{cls.__name__}: argsz {argsz} is smaller than {head}")
        caps = decode_chain(payload, cap_offset, head) if flags & p.REGION_FLAG_CAPS else []
        return cls(index, flags, size, offset, caps, fds[0] if fds else None, argsz)


# -- DEVICE_SET_IRQS (§3.6) -----------------------------------------------------------------
@dataclass(slots=True)
class SetIrqsRequest(_Fixed):
    COMMAND = Command.DEVICE_SET_IRQS
    MAX_FDS = 1 << 16  # bounded by the connection's fd limit
    LAYOUT = p.SET_IRQS
    FIELDS = ("argsz", "flags", "index", "start", "count")
    index: int
    flags: int
    start: int = 0
    count: int = 0
    fds: list[int] = field(default_factory=list)
    data: bytes = b""  # DATA_BOOL only: one byte per sub-index
    argsz: int = p.SET_IRQS.size

    def attached_fds(self) -> list[int]:
        return list(self.fds)

    def parts(self) -> tuple[Buffer, ...]:
        return (self._head(), self.data)

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        kw, _ = cls._fields(payload, exact=False)
        data = bytes(payload[p.SET_IRQS.size:])
        if kw["flags"] & p.IRQ_SET_DATA_BOOL:
            if len(data) != kw["count"]:
                raise MessageError(f"SET_IRQS: {len(data)} bool bytes for count {kw['count']}")
        elif data:
            raise MessageError("SET_IRQS: data follows a request without DATA_BOOL")
        return cls(**kw, fds=list(fds), data=data)


@dataclass(slots=True)
class SetIrqsReply(Message):
    COMMAND = Command.DEVICE_SET_IRQS
    IS_REPLY = True


# -- REGION_READ / REGION_WRITE / REGION_WRITE_MULTI (§3.7) ---------------------------------------
# Region accesses are the hot path (one message per guest MMIO access): decoded without kwargs.
@dataclass(slots=True)
class _RegionCount(_Fixed):
    LAYOUT = p.REGION_ACCESS
    FIELDS = ("offset", "region", "count")
    region: int
    offset: int
    count: int

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        if len(payload) != 16:
            raise _size_error(cls.__name__, len(payload), 16, True)
        offset, region, count = p.REGION_ACCESS.unpack_from(payload)
        return cls(region, offset, count)


@dataclass(slots=True)
class _RegionData(_Counted):
    LAYOUT = p.REGION_ACCESS
    FIELDS = ("offset", "region")
    region: int
    offset: int
    data: bytes

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        if len(payload) < 16:
            raise _size_error(cls.__name__, len(payload), 16, False)
        offset, region, count = p.REGION_ACCESS.unpack_from(payload)
        if count != len(payload) - 16:
            raise MessageError(f"{cls.__name__}: count {count} but {len(payload) - 16} data bytes")
        return cls(region, offset, bytes(payload[16:]))


@dataclass(slots=True)
class RegionReadRequest(_RegionCount):
    COMMAND = Command.REGION_READ


@dataclass(slots=True)
class RegionReadReply(_RegionData):
    COMMAND = Command.REGION_READ
    IS_REPLY = True


@dataclass(slots=True)
class RegionWriteRequest(_RegionData):
    COMMAND = Command.REGION_WRITE


@dataclass(slots=True)
class RegionWriteReply(_RegionCount):
    COMMAND = Command.REGION_WRITE
    IS_REPLY = True


@dataclass(slots=True)
class RegionWriteMultiRequest(Message):
    """Coalesced small writes, applied in order: (region, offset, data of 1-8 bytes)."""

    COMMAND = Command.REGION_WRITE_MULTI
    writes: list[tuple[int, int, bytes]] = field(default_factory=list)

    def parts(self) -> tuple[Buffer, ...]:
        entries = [p.WRITE_MULTI_ENTRY.pack(off, region, len(data), data) for region, off, data in self.writes]
        return (p.WRITE_MULTI_HEAD.pack(len(self.writes)), *entries)

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        head, entry = p.WRITE_MULTI_HEAD.size, p.WRITE_MULTI_ENTRY.size
        if len(payload) < head:
            raise _size_error(cls.__name__, len(payload), head, False)
        (n,) = p.WRITE_MULTI_HEAD.unpack_from(payload)
        if len(payload) != head + n * entry:
            raise MessageError(f"REGION_WRITE_MULTI: {len(payload)}-byte payload for {n} writes")
        writes = []
        for off, region, count, data in p.WRITE_MULTI_ENTRY.iter_unpack(payload[head:]):
            if not 0 < count <= p.WRITE_MULTI_MAX_DATA:
                raise MessageError(f"REGION_WRITE_MULTI: write of {count} bytes")
            writes.append((region, off, data[:count]))
        return cls(writes)


@dataclass(slots=True)
class RegionWriteMultiReply(_Fixed):
    COMMAND = Command.REGION_WRITE_MULTI
    IS_REPLY = True
    LAYOUT = p.WRITE_MULTI_HEAD
    FIELDS = ("wr_cnt",)
    wr_cnt: int


# -- DMA_READ / DMA_WRITE, server to client (§3.8, spec layout) ----------------------------------------
@dataclass(slots=True)
class _DmaCount(_Fixed):
    LAYOUT = p.DMA_RW
    FIELDS = ("address", "count")
    address: int
    count: int


@dataclass(slots=True)
class _DmaData(_Counted):
    LAYOUT = p.DMA_RW
    FIELDS = ("address",)
    address: int
    data: bytes


@dataclass(slots=True)
class DmaReadRequest(_DmaCount):
    COMMAND = Command.DMA_READ


@dataclass(slots=True)
class DmaReadReply(_DmaData):
    COMMAND = Command.DMA_READ
    IS_REPLY = True


@dataclass(slots=True)
class DmaWriteRequest(_DmaData):
    COMMAND = Command.DMA_WRITE


@dataclass(slots=True)
class DmaWriteReply(_DmaCount):
    """The spec's reply carries address and count; a bare header is accepted too (older QEMU)."""

    COMMAND = Command.DMA_WRITE
    IS_REPLY = True

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        if not len(payload):
            return cls(0, 0)
        return cls(**cls._fields(payload)[0])


# -- DEVICE_RESET (§3.9) ------------------------------------------------------------------------
@dataclass(slots=True)
class DeviceResetRequest(Message):
    COMMAND = Command.DEVICE_RESET


@dataclass(slots=True)
class DeviceResetReply(Message):
    COMMAND = Command.DEVICE_RESET
    IS_REPLY = True


# -- DEVICE_FEATURE, MIG_DATA_READ / MIG_DATA_WRITE (§3.11) ------------------------------------------
@dataclass(slots=True)
class _DeviceFeature(_Fixed):
    COMMAND = Command.DEVICE_FEATURE
    LAYOUT = p.DEVICE_FEATURE
    FIELDS = ("argsz", "flags")
    flags: int
    data: bytes = b""
    argsz: int = 0  # 0: the size of this payload

    def parts(self) -> tuple[Buffer, ...]:
        return (p.DEVICE_FEATURE.pack(self.argsz or p.DEVICE_FEATURE.size + len(self.data), self.flags), self.data)

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        kw, _ = cls._fields(payload, exact=False)
        return cls(**kw, data=bytes(payload[p.DEVICE_FEATURE.size:]))


@dataclass(slots=True)
class DeviceFeatureRequest(_DeviceFeature):
    pass


@dataclass(slots=True)
class DeviceFeatureReply(_DeviceFeature):
    IS_REPLY = True


@dataclass(slots=True)
class MigDataReadRequest(_Fixed):
    """``argsz`` is the room for the reply: 8 + ``size`` (0: that), which libvfio-user requires."""

    COMMAND = Command.MIG_DATA_READ
    LAYOUT = p.MIG_DATA
    FIELDS = ("argsz", "size")
    size: int
    argsz: int = 0

    def parts(self) -> tuple[Buffer, ...]:
        return (p.MIG_DATA.pack(self.argsz or p.MIG_DATA.size + self.size, self.size),)


@dataclass(slots=True)
class _MigData(_Counted):
    """argsz, size, data; ``argsz`` 0 encodes as 8 + size (libvfio-user wants exactly that)."""

    LAYOUT = p.MIG_DATA
    FIELDS = ("argsz",)
    data: bytes
    argsz: int = 0

    def parts(self) -> tuple[Buffer, ...]:
        return (p.MIG_DATA.pack(self.argsz or p.MIG_DATA.size + len(self.data), len(self.data)), self.data)


@dataclass(slots=True)
class MigDataReadReply(_MigData):
    """A reply may carry more bytes than ``size`` (libvfio-user pads the last, short
    reply to the requested length): ``size`` is the length of the data."""

    COMMAND = Command.MIG_DATA_READ
    IS_REPLY = True

    @classmethod
    def decode(cls, payload: memoryview, fds: list[int]) -> Self:
        kw, values = cls._fields(payload, exact=False)
        data = payload[p.MIG_DATA.size:]
        if values[-1] > len(data):
            raise MessageError(f"MIG_DATA_READ reply: size {values[-1]} but {len(data)} data bytes")
        return cls(**kw, data=bytes(data[:values[-1]]))


@dataclass(slots=True)
class MigDataWriteRequest(_MigData):
    COMMAND = Command.MIG_DATA_WRITE


@dataclass(slots=True)
class MigDataWriteReply(Message):
    COMMAND = Command.MIG_DATA_WRITE
    IS_REPLY = True


# -- errors ---------------------------------------------------------------------------------
@dataclass(slots=True)
class ErrorReply(Message):
    """A reply with the ERROR flag: header only, ``errno`` in the header (§1.2)."""

    IS_REPLY = True
    command: int = 0
    errno: int = 0


REQUEST_TYPES: dict[int, type[Message]] = {cls.COMMAND: cls for cls in (
    VersionRequest, DmaMapRequest, DmaUnmapRequest, DeviceInfoRequest, RegionInfoRequest, IrqInfoRequest,
    SetIrqsRequest, RegionReadRequest, RegionWriteRequest, DmaReadRequest, DmaWriteRequest,
    DeviceResetRequest, RegionWriteMultiRequest, DeviceFeatureRequest, MigDataReadRequest,
    MigDataWriteRequest)}
REPLY_TYPES: dict[int, type[Message]] = {cls.COMMAND: cls for cls in (
    VersionReply, DmaMapReply, DmaUnmapReply, DeviceInfoReply, RegionInfoReply, IrqInfoReply,
    SetIrqsReply, RegionReadReply, RegionWriteReply, DmaReadReply, DmaWriteReply, DeviceResetReply,
    RegionWriteMultiReply, DeviceFeatureReply, MigDataReadReply, MigDataWriteReply)}
# Requests the server sends to the client; every other request goes client -> server.
SERVER_REQUESTS = frozenset({Command.DMA_READ, Command.DMA_WRITE})
