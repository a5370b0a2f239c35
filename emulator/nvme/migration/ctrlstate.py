"""The Controller State data structure: build (Get), parse and commit (Set).

Layout (Base 2.1 Figures 358-361 [2.3 §5.2.16.1.1]): 48-byte header, then the
NVMe Controller State version 0 (I/O SQ and CQ State records, 24 bytes each,
ascending identifiers) when a CSVI is given, then the vendor specific data when
a CSUUIDI is given.

nvme-emu's vendor specific format (UUID ``wire.VENDOR_STATE_UUID``, advertised
in CNS 20h) is a 32-byte header (magic, format, JSON length, CRC-32) and the
JSON of ``ControllerState.to_dict()`` -- registers, admin and I/O queues,
features, interrupt vector configuration, outstanding AERs and pending events,
error log, host identifier... -- plus the controller's counters and clocks,
padded to a dword.  It holds everything needed to resume on another process
without the host enabling the controller again.  When both parts are present
the I/O queues come from the NVMe-defined part (the spec's part wins).
"""
from __future__ import annotations

import json
import time
import weakref
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from emulator.nvme import queues
from emulator.nvme.migration import wire
from emulator.nvme.migration.model import MMC_KEY, TARGET_KEY, target_state
from emulator.nvme.spec import (
    CC_MPS_MASK, CC_MPS_SHIFT, CommandSpecific, invalid_field, specific,
)
from emulator.nvme.state import ControllerState, CQState, SQState

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller

# Index lists of Identify CNS 20h (1-based indices CSVI / CSUUIDI).
VERSIONS: tuple[int, ...] = (wire.NVME_CS_VERSION_0,)
UUIDS: tuple[bytes, ...] = (wire.VENDOR_STATE_UUID.bytes,)
MAX_STATE_BYTES = 16 << 20  # a Set Controller State sequence beyond this: 38h

_LOCAL_KEYS = (MMC_KEY, TARGET_KEY)  # vendor entries that stay with the controller


@dataclass
class ParsedState:
    sqs: list[SQState] = field(default_factory=list)  # NVMe-defined I/O queues
    cqs: list[CQState] = field(default_factory=list)
    has_nvme: bool = False
    vendor: dict[str, Any] | None = None


def check_indices(csvi: int, csuuidi: int) -> None:
    """CSVI / CSUUIDI must be 0 or name an entry of CNS 20h (Invalid Field)."""
    if csvi > len(VERSIONS):
        raise invalid_field(f"CSVI {csvi} not in the Supported Controller State Formats")
    if csuuidi > len(UUIDS):
        raise invalid_field(f"CSUUIDI {csuuidi} not in the Supported Controller State Formats")


# ------------------------------------------------------------------ Get
# The Controller State of a suspended controller, built once and served to
# every Migration Receive piece until something changes it (runtime cache,
# not controller state).
_BUILT: "weakref.WeakKeyDictionary[Controller, tuple[tuple[Any, ...], bytes]]" = \
    weakref.WeakKeyDictionary()


def build(target: "Controller", csvi: int, csuuidi: int) -> bytes:
    """The Controller State of ``target``; one ``snapshot()`` feeds both parts, so
    the NVMe-defined queue records and the vendor part agree (shadow doorbells
    included).  No side effect on the target (Base 2.1 §5.1.16: a Get)."""
    key = _cache_key(target, csvi, csuuidi)
    if key is not None:
        hit = _BUILT.get(target)
        if hit is not None and hit[0] == key:
            return hit[1]
    state = target.snapshot()
    nvme = _nvme_part(state) if csvi else b""
    vendor = _vendor_part(target, state) if csuuidi else b""
    csattr = wire.CSATTR_SUSPENDED if target.state.suspended else 0
    head = wire.CS_HEADER.pack(0, csattr, len(nvme) // 4, 0, len(vendor) // 4, 0)
    data = head + nvme + vendor
    if key is not None:
        _BUILT[target] = (key, data)
    return data


def _cache_key(target: "Controller", csvi: int, csuuidi: int) -> tuple[Any, ...] | None:
    """What the state of a suspended controller can still depend on: the
    suspension itself, the state object (Set Controller State replaces it) and
    the doorbell values the host wrote meanwhile.  None: not suspended, build."""
    if not target.state.suspended:
        return None
    ts = target_state(target)
    doorbells = tuple((q.qid, q.tail) for q in target.sqs.values()) + \
        tuple((q.qid, q.head) for q in target.cqs.values())
    return (csvi, csuuidi, tuple(ts.suspended_at), id(target.state), doorbells)


def forget(target: "Controller") -> None:
    """Drop the built state (Set Controller State committed, Resume)."""
    _BUILT.pop(target, None)


def _nvme_part(state: ControllerState) -> bytes:
    sqs = [q for q in state.sqs if q.qid]
    cqs = [q for q in state.cqs if q.qid]
    out = bytearray(wire.NVMECS_HEADER.pack(VERSIONS[0], len(sqs), len(cqs)))
    for sq in sqs:
        iosqa = int(sq.pc) | (sq.qprio << wire.IOSQA_QPRIO_SHIFT)
        out += wire.IOSQ_STATE.pack(sq.base, sq.size - 1, sq.qid, sq.cqid, iosqa, sq.head, sq.tail)
    for cq in cqs:
        iocqa = (int(cq.pc) | (wire.IOCQA_IEN if cq.ien else 0)
                 | (wire.IOCQA_S0PT if queues.s0pt(cq) else 0) | (cq.iv << wire.IOCQA_IV_SHIFT))
        out += wire.IOCQ_STATE.pack(cq.base, cq.size - 1, cq.qid, cq.head, cq.tail, iocqa)
    return bytes(out)


def _vendor_part(target: "Controller", snap: ControllerState) -> bytes:
    # Clocks as of the suspend when suspended (the pieces of one state agree).
    now, wall = target_state(target).suspended_at or [time.monotonic(), time.time()]
    doc = target.export_state(now, snap)
    for key in _LOCAL_KEYS:
        doc["state"]["vendor"].pop(key, None)
    ts = doc["state"]["vendor"].pop("timestamp", None)  # [ms, monotonic origin] (features.py)
    # Timestamp feature: the value then, and the wall clock to catch up with.
    doc["timestamp_ms"] = None if ts is None else int(ts[0] + (now - ts[1]) * 1000)
    doc["wall_clock"] = wall
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 4)
    head = wire.VENDOR_STATE_HEADER.pack(wire.VENDOR_STATE_MAGIC, wire.VENDOR_STATE_FORMAT, 0,
                                         len(body), zlib.crc32(body))
    return head + body


# ------------------------------------------------------------------ Set
def expected_size(data: bytes | bytearray) -> int | None:
    """Total size the header announces, once the header is there."""
    if len(data) < wire.CS_HEADER.size:
        return None
    _, _, css, css_hi, vss, vss_hi = wire.CS_HEADER.unpack_from(data)
    if css_hi or vss_hi:
        return MAX_STATE_BYTES + 1
    return wire.CS_HEADER.size + 4 * (css + vss)


def parse(target: "Controller", data: bytes, csvi: int, csuuidi: int) -> ParsedState:
    """Verify a complete Controller State (Invalid Field on anything wrong)."""
    if csvi == 0 and csuuidi == 0:
        raise invalid_field("CSVI and CSUUIDI both 0")
    size = expected_size(data)
    if size is None or size != len(data):
        raise invalid_field(f"Controller State is {len(data)} bytes, header says {size}")
    ver, _, css, _, vss, _ = wire.CS_HEADER.unpack_from(data)
    if ver != 0:
        raise invalid_field(f"Controller State VER {ver}")
    if css and not csvi:
        raise invalid_field("NVMECSS != 0 with CSVI 0")
    if vss and not csuuidi:
        raise invalid_field("VSS != 0 with CSUUIDI 0")
    out = ParsedState()
    pos = wire.CS_HEADER.size
    if css:
        if any(k for k in target.sqs) or any(k for k in target.cqs):
            raise invalid_field("the controller already has I/O queues")
        _parse_nvme(target, data[pos:pos + 4 * css], VERSIONS[csvi - 1], out)
        pos += 4 * css
    if vss:
        out.vendor = _parse_vendor(data[pos:pos + 4 * vss])
    _check_queues(target, out)
    return out


def _parse_nvme(target: "Controller", part: bytes, version: int, out: ParsedState) -> None:
    if len(part) < wire.NVMECS_HEADER.size:
        raise invalid_field("NVMe Controller State truncated")
    ver, niosq, niocq = wire.NVMECS_HEADER.unpack_from(part)
    if ver != version:
        raise invalid_field(f"NVMe Controller State VER {ver} != CSVI's {version}")
    if len(part) != wire.NVMECS_HEADER.size + 24 * (niosq + niocq):
        raise invalid_field("NVMECSS does not match NIOSQ/NIOCQ")
    pos = wire.NVMECS_HEADER.size
    for _ in range(niosq):
        prp1, qsize, sqid, cqid, iosqa, hp, tp = wire.IOSQ_STATE.unpack_from(part, pos)
        out.sqs.append(SQState(qid=sqid, base=prp1, size=qsize + 1, cqid=cqid, head=hp, tail=tp,
                               qprio=(iosqa >> wire.IOSQA_QPRIO_SHIFT) & 0x3,
                               pc=bool(iosqa & wire.IOSQA_PC)))
        pos += wire.IOSQ_STATE.size
    for _ in range(niocq):
        prp1, qsize, cqid, hp, tp, iocqa = wire.IOCQ_STATE.unpack_from(part, pos)
        s0pt = 1 if iocqa & wire.IOCQA_S0PT else 0
        out.cqs.append(CQState(qid=cqid, base=prp1, size=qsize + 1, head=hp, tail=tp,
                               iv=iocqa >> wire.IOCQA_IV_SHIFT, ien=bool(iocqa & wire.IOCQA_IEN),
                               phase=queues.phase_from_s0pt(tp, s0pt),
                               pc=bool(iocqa & wire.IOCQA_PC)))
        pos += wire.IOCQ_STATE.size
    out.has_nvme = True
    for name, qs in (("SQ", out.sqs), ("CQ", out.cqs)):
        ids = [q.qid for q in qs]
        if ids != sorted(set(ids)):
            raise invalid_field(f"I/O {name} State records not in ascending, unique order")


def _parse_vendor(part: bytes) -> dict[str, Any]:
    if len(part) < wire.VENDOR_STATE_HEADER.size:
        raise invalid_field("vendor specific state truncated")
    magic, fmt, _, length, crc = wire.VENDOR_STATE_HEADER.unpack_from(part)
    body = part[wire.VENDOR_STATE_HEADER.size:wire.VENDOR_STATE_HEADER.size + length]
    if magic != wire.VENDOR_STATE_MAGIC or fmt != wire.VENDOR_STATE_FORMAT:
        raise invalid_field("not an nvme-emu vendor specific controller state")
    if len(body) != length or zlib.crc32(body) != crc:
        raise invalid_field("vendor specific state corrupted (length or CRC)")
    try:
        doc = json.loads(body)
        doc["state"] = ControllerState.from_dict(doc["state"])
    except (ValueError, KeyError, TypeError) as e:
        raise invalid_field(f"vendor specific state unreadable: {e}") from e
    return doc


def _check_queues(target: "Controller", p: ParsedState) -> None:
    """The queues to create must fit this controller (as Create I/O CQ/SQ would check)."""
    if p.has_nvme:
        sqs, cqs = p.sqs, p.cqs
    elif p.vendor is not None:
        st: ControllerState = p.vendor["state"]
        sqs, cqs = [q for q in st.sqs if q.qid], [q for q in st.cqs if q.qid]
    else:
        return
    cc = p.vendor["state"].regs.cc if p.vendor is not None else target.state.regs.cc
    page = 1 << (12 + ((cc >> CC_MPS_SHIFT) & CC_MPS_MASK))
    cfg = target.config
    cqids = {q.qid for q in cqs}
    every: list[SQState | CQState] = [*sqs, *cqs]
    for q in every:
        if q.qid > cfg.max_io_queues:  # more queues than this controller has
            raise specific(CommandSpecific.NOT_ENOUGH_RESOURCES, f"queue {q.qid}")
        if (q.qid == 0 or not 2 <= q.size <= cfg.mqes + 1 or not q.pc or not q.base
                or q.base & (page - 1) or q.head >= q.size or q.tail >= q.size):
            raise invalid_field(f"queue {q.qid} state invalid")
    for sq in sqs:
        if sq.cqid not in cqids:
            raise invalid_field(f"SQ {sq.qid} bound to missing CQ {sq.cqid}")
    for cq in cqs:
        if cq.iv >= cfg.msix_vectors:
            raise invalid_field(f"CQ {cq.qid} interrupt vector {cq.iv}")


def commit(target: "Controller", p: ParsedState) -> None:
    """Make the verified state the controller's state (queues created, pointers set)."""
    if p.vendor is not None:
        doc = p.vendor
        state: ControllerState = doc["state"]
        for key in _LOCAL_KEYS:  # the target keeps its own TP4159 bookkeeping
            if key in target.state.vendor:
                state.vendor[key] = target.state.vendor[key]
        state.cntlid = target.cntlid
        state.suspended = target.state.suspended
        if p.has_nvme:
            state.sqs = [q for q in state.sqs if q.qid == 0] + p.sqs
            state.cqs = [q for q in state.cqs if q.qid == 0] + p.cqs
        now = time.monotonic()
        if doc.get("timestamp_ms") is not None:
            behind = max(0.0, time.time() - doc.get("wall_clock", time.time()))
            state.vendor["timestamp"] = [doc["timestamp_ms"], now - behind]
        forget(target)
        target.import_state({**doc, "state": state})
        return
    forget(target)
    for cq in p.cqs:
        target.cqs[cq.qid] = cq
    for sq in p.sqs:
        target.sqs[sq.qid] = sq
