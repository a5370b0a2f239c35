"""Region-info capability chains (§3.3): encoding, decoding, the sparse-mmap cap.

A chain starts at an offset from the start of the 32-byte region-info struct;
every cap is an 8-byte header (id, version, next) and a body; ``next`` is the
offset of the following cap from the same origin, 0 for the last one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from emulator.vfio_user import protocol as p
from emulator.vfio_user.protocol import Buffer, MessageError


@dataclass(slots=True)
class RegionCap:
    """One capability: header id/version, and the body after the header."""

    id: int
    version: int = 1
    body: bytes = b""


def sparse_mmap_cap(areas: Sequence[tuple[int, int]]) -> RegionCap:
    """SPARSE_MMAP v1 for (offset, size) areas relative to the region's offset."""
    body = p.SPARSE_MMAP_HEAD.pack(len(areas), 0) + b"".join(p.SPARSE_MMAP_AREA.pack(o, s) for o, s in areas)
    return RegionCap(p.REGION_CAP_SPARSE_MMAP, 1, body)


def parse_sparse_mmap(body: Buffer) -> list[tuple[int, int]]:
    head, area = p.SPARSE_MMAP_HEAD.size, p.SPARSE_MMAP_AREA.size
    if len(body) < head:
        raise MessageError("sparse mmap capability is truncated")
    (n, _) = p.SPARSE_MMAP_HEAD.unpack_from(body)
    if len(body) < head + n * area:
        raise MessageError(f"sparse mmap capability too short for {n} areas")
    return [p.SPARSE_MMAP_AREA.unpack_from(body, head + i * area) for i in range(n)]


def chain_size(caps: Sequence[RegionCap]) -> int:
    return sum(p.REGION_CAP_HEADER.size + len(cap.body) for cap in caps)


def encode_chain(caps: Sequence[RegionCap], start: int) -> list[Buffer]:
    """The chain laid out from offset ``start``, as buffers."""
    out: list[Buffer] = []
    pos = start
    for i, cap in enumerate(caps):
        end = pos + p.REGION_CAP_HEADER.size + len(cap.body)
        out += [p.REGION_CAP_HEADER.pack(cap.id, cap.version, end if i + 1 < len(caps) else 0), cap.body]
        pos = end
    return out


def decode_chain(payload: memoryview, pos: int, first: int) -> list[RegionCap]:
    """The chain starting at ``pos``; no cap may start before ``first`` or go backwards.

    A body runs to the next cap, the last one to the end of ``payload``; a
    sparse-mmap body is checked against its area count.
    """
    caps: list[RegionCap] = []
    while True:
        if pos < first or pos + p.REGION_CAP_HEADER.size > len(payload):
            raise MessageError(f"region capability at {pos} is outside the reply")
        cap_id, version, nxt = p.REGION_CAP_HEADER.unpack_from(payload, pos)
        if nxt and nxt <= pos:
            raise MessageError("region capability chain goes backwards")
        caps.append(RegionCap(cap_id, version, bytes(payload[pos + p.REGION_CAP_HEADER.size:nxt or len(payload)])))
        if cap_id == p.REGION_CAP_SPARSE_MMAP:
            parse_sparse_mmap(caps[-1].body)
        if not nxt:
            return caps
        pos = nxt
