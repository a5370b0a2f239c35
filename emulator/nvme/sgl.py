"""Scatter Gather Lists for I/O commands (Base 2.1 §4.3.2).

SGL Descriptor (Figure 116): Address (bytes 7:0), Length (11:8), reserved,
SGL Identifier (byte 15: Descriptor Type 7:4, Sub Type 3:0).  Supported on
PCIe (Identify Controller SGLS bits 1:0 = 01b, no alignment requirement):

* Data Block (type 0h): a buffer;
* Segment (2h): points to a segment, an array of descriptors whose last entry
  may be a Segment or Last Segment descriptor naming the next one;
* Last Segment (3h): points to the final segment, which holds no Segment or
  Last Segment descriptor.

SGL1 lives in the command's DPTR (the PRP1/PRP2 bytes).  Sub Type must be
0h (address).  Bit Bucket, Keyed and Transport descriptors are not supported
(SGLS bits 16, 2 are 0): SGL Descriptor Type Invalid.  The descriptors must
describe exactly the transfer (SGLS bit 18, oversized lists, is 0): Data SGL
Length Invalid otherwise.  A malformed segment (length not a multiple of 16,
zero, a segment descriptor anywhere but last, or inside a Last Segment) is
Invalid SGL Segment Descriptor; more than MAX_DESCRIPTORS descriptors (a
chain that loops) is Invalid Number of SGL Descriptors.
"""
from __future__ import annotations

import struct
from enum import IntEnum
from typing import TYPE_CHECKING

from emulator.nvme.spec import NvmeError, SCT

if TYPE_CHECKING:
    from emulator.memory import GuestMemory

SGL_DESCRIPTOR = struct.Struct("<QI3xB")  # Address, Length, reserved, SGL Identifier
DATA_BLOCK, BIT_BUCKET, SEGMENT, LAST_SEGMENT = 0x0, 0x1, 0x2, 0x3
SGLS_SUPPORTED = 0x1  # Identify Controller SGLS (bytes 539:536) bits 1:0
MAX_DESCRIPTORS = 1 << 16


class SglStatus(IntEnum):
    """Generic Command Status values for SGLs (Base 2.1 Figure 102)."""
    INVALID_SGL_SEGMENT_DESCRIPTOR = 0x0D
    INVALID_NUMBER_OF_SGL_DESCRIPTORS = 0x0E
    DATA_SGL_LENGTH_INVALID = 0x0F
    SGL_DESCRIPTOR_TYPE_INVALID = 0x11


def _error(sc: SglStatus, msg: str) -> NvmeError:
    return NvmeError(SCT.GENERIC, sc, msg=msg)


def sgl_segments(memory: "GuestMemory", sgl1: bytes, length: int) -> list[tuple[int, int]]:
    """The (address, length) pieces of a ``length``-byte transfer described by SGL1.

    SGL1 is walked as a segment of one descriptor that may point onwards."""
    segs: list[tuple[int, int]] = []
    total = 0
    entries = [SGL_DESCRIPTOR.unpack(sgl1)]
    seen = 1
    last = False  # inside the segment a Last Segment descriptor named
    while True:
        nxt = None
        for i, (addr, n, ident) in enumerate(entries):
            dtype, subtype = ident >> 4, ident & 0xF
            if subtype != 0:
                raise _error(SglStatus.SGL_DESCRIPTOR_TYPE_INVALID, f"SGL sub type {subtype:#x}")
            if dtype == DATA_BLOCK:
                if n:
                    segs.append((addr, n))
                    total += n
            elif dtype in (SEGMENT, LAST_SEGMENT):
                if last or i != len(entries) - 1:
                    raise _error(SglStatus.INVALID_SGL_SEGMENT_DESCRIPTOR,
                                 "segment descriptor inside a last segment or not last in its segment")
                nxt = (addr, n, dtype == LAST_SEGMENT)
            else:
                raise _error(SglStatus.SGL_DESCRIPTOR_TYPE_INVALID, f"SGL descriptor type {dtype:#x}")
            if total > length:
                break
        if nxt is None or total > length:
            break
        addr, n, last = nxt
        if n == 0 or n % SGL_DESCRIPTOR.size:
            raise _error(SglStatus.INVALID_SGL_SEGMENT_DESCRIPTOR, f"SGL segment of {n} bytes")
        count = n // SGL_DESCRIPTOR.size
        seen += count
        if seen > MAX_DESCRIPTORS:
            raise _error(SglStatus.INVALID_NUMBER_OF_SGL_DESCRIPTORS, f"more than {MAX_DESCRIPTORS}")
        raw = memory.read(addr, n)
        entries = [SGL_DESCRIPTOR.unpack_from(raw, k * SGL_DESCRIPTOR.size) for k in range(count)]
    if total != length:
        raise _error(SglStatus.DATA_SGL_LENGTH_INVALID, f"SGL describes {total} bytes, transfer is {length}")
    return segs
