"""The device migration stream of an nvme-emu function (vfio-user migration v2).

A byte stream of sections (docs/vfio-user-migration.md).  Every section is
a 16-byte head -- type u16, reserved u16, sequence number u32 (0, 1, 2...
across the whole stream, pre-copy and stop-copy), body length u32, CRC-32
u32 of the head (CRC field 0) and body -- and its body:

* HEADER: magic ``NVMEMIG2``, version u32, flags u32 (bit 0: namespaces on
  shared storage, no user data follows);
* DATA: NSID u32, reserved u32, SLBA u64, then whole LBAs of user data;
* CONTROLLER: the Controller State structure Get Controller State returns
  (NVMe-defined and nvme-emu vendor parts, Base 2.1 Figure 358), the same
  state the live-migration hand-over moves;
* PCI: the PCI function state (config space, MSI-X table and PBA) as JSON;
* END: sections before it u32, reserved u32.

:class:`StreamParser` checks each section as its last byte arrives: the
first must be a HEADER of this version, sequence numbers must follow, the
CRC must match, nothing may follow END.  Any departure raises
:class:`StreamError` and the parser refuses everything after.
"""
from __future__ import annotations

import enum
import zlib
from struct import Struct

MAGIC = b"NVMEMIG2"
VERSION = 1
FLAG_SHARED_STORAGE = 1 << 0
MAX_SECTION = 64 << 20  # a body longer than this is corrupt

SECTION = Struct("<HHIII")  # type, reserved, seq, length, crc32
HEADER_BODY = Struct("<8sII")  # magic, version, flags
DATA_HEAD = Struct("<IIQ")  # nsid, reserved, slba
END_BODY = Struct("<II")  # sections before END, reserved


class Kind(enum.IntEnum):
    HEADER = 1
    DATA = 2
    CONTROLLER = 3
    PCI = 4
    END = 5


class StreamError(ValueError):
    """The stream is corrupt, truncated or of another version."""


def section(kind: Kind, seq: int, body: bytes | bytearray | memoryview) -> bytes:
    head = SECTION.pack(kind, 0, seq, len(body), 0)
    crc = zlib.crc32(body, zlib.crc32(head))
    return SECTION.pack(kind, 0, seq, len(body), crc) + bytes(body)


class StreamWriter:
    """Numbers the sections of one stream."""

    def __init__(self) -> None:
        self.seq = 0

    def add(self, kind: Kind, body: bytes | bytearray | memoryview) -> bytes:
        out = section(kind, self.seq, body)
        self.seq += 1
        return out

    def header(self, shared_storage: bool) -> bytes:
        return self.add(Kind.HEADER, HEADER_BODY.pack(MAGIC, VERSION, FLAG_SHARED_STORAGE if shared_storage else 0))

    def end(self) -> bytes:
        return self.add(Kind.END, END_BODY.pack(self.seq, 0))


class StreamParser:
    def __init__(self) -> None:
        self._buf = bytearray()
        self.seq = 0
        self.flags = 0
        self.ended = False
        self.error: StreamError | None = None

    def feed(self, data: bytes) -> list[tuple[Kind, bytes]]:
        """The sections ``data`` completes, each verified; StreamError on anything wrong."""
        if self.error is not None:
            raise self.error
        try:
            return self._feed(data)
        except StreamError as e:
            self.error = e
            self._buf.clear()
            raise

    def _feed(self, data: bytes) -> list[tuple[Kind, bytes]]:
        if self.ended and data:
            raise StreamError("data after the END section")
        self._buf += data
        out: list[tuple[Kind, bytes]] = []
        while len(self._buf) >= SECTION.size:
            kind, reserved, seq, length, crc = SECTION.unpack_from(self._buf)
            if length > MAX_SECTION or kind not in Kind._value2member_map_ or reserved:
                raise StreamError(f"section {self.seq}: type {kind}, reserved {reserved}, length {length}")
            if seq != self.seq:
                raise StreamError(f"section {seq} where {self.seq} was expected")
            if len(self._buf) < SECTION.size + length:
                break
            body = bytes(self._buf[SECTION.size:SECTION.size + length])
            head = SECTION.pack(kind, 0, seq, length, 0)
            if zlib.crc32(body, zlib.crc32(head)) != crc:
                raise StreamError(f"section {seq}: CRC mismatch")
            del self._buf[:SECTION.size + length]
            kind = Kind(kind)
            if seq == 0:
                self._check_header(kind, body)
            elif kind == Kind.HEADER:
                raise StreamError(f"a second HEADER at section {seq}")
            if kind == Kind.END:
                (count, _) = END_BODY.unpack(body) if len(body) == END_BODY.size else (-1, 0)
                if count != seq:
                    raise StreamError(f"END says {count} sections, {seq} came")
                self.ended = True
                if self._buf:
                    raise StreamError("data after the END section")
            self.seq += 1
            out.append((kind, body))
        return out

    def _check_header(self, kind: Kind, body: bytes) -> None:
        if kind != Kind.HEADER or len(body) != HEADER_BODY.size:
            raise StreamError("the stream does not start with a HEADER section")
        magic, version, flags = HEADER_BODY.unpack(body)
        if magic != MAGIC:
            raise StreamError("not an nvme-emu migration stream")
        if version != VERSION:
            raise StreamError(f"stream version {version}, this device reads {VERSION}")
        self.flags = flags

    def finish(self) -> None:
        """The stream must be whole: END seen, nothing pending."""
        if self.error is not None:
            raise self.error
        if not self.ended:
            raise StreamError(f"truncated stream: no END after {self.seq} sections"
                              + (f" ({len(self._buf)} bytes of a partial section)" if self._buf else ""))
