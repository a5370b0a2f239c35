"""Per-controller command statistics for the management socket (``stats``).

The hot path is :meth:`CommandStats.record`: a handful of integer operations
per command (a dict lookup, three additions, a bit length).  Everything that
turns counts into names and bounds happens in :meth:`CommandStats.to_dict`,
when somebody asks.

* commands and bytes by opcode, admin and I/O apart (bytes: the command's
  PRP data transfer, both directions);
* completions with an error status by (SCT, SC) (Base 2.1 §4.2.3; the DNR and
  More bits are left out);
* a latency histogram per queue kind: the time from fetching the SQE to
  posting its CQE, in power-of-two buckets of 1024 ns.  Commands whose file
  work runs on a worker thread (emulator/nvme/offload.py: Flush, large
  deallocations) are counted when they complete; held Asynchronous Event
  Requests are not counted.
"""
from __future__ import annotations

from typing import Any

from emulator.nvme.spec import SCT, AdminOpcode, CommandSpecific, Generic, IoOpcode

LAT_BUCKETS = 24  # bucket i < 24: latency < 1024 ns * 2**i; the last one is open-ended
LAT_UNIT_NS = 1024
STATUS_MASK = 0x7FF  # SC (bits 7:0) and SCT (bits 10:8) of the Status Field


class QueueKindStats:
    """Counters of one queue kind (admin or I/O)."""
    __slots__ = ("ops", "latency")

    def __init__(self) -> None:
        self.ops: dict[int, list[int]] = {}      # opcode -> [commands, bytes]
        self.latency = [0] * LAT_BUCKETS


class CommandStats:
    __slots__ = ("admin", "io", "errors")

    def __init__(self) -> None:
        self.admin = QueueKindStats()
        self.io = QueueKindStats()
        self.errors: dict[int, int] = {}         # Status Field & STATUS_MASK -> completions

    def record(self, sqid: int, opc: int, status: int, nbytes: int, elapsed_ns: int) -> None:
        kind = self.io if sqid else self.admin
        c = kind.ops.get(opc)
        if c is None:
            c = kind.ops[opc] = [0, 0]
        c[0] += 1
        c[1] += nbytes
        if status:
            key = status & STATUS_MASK
            self.errors[key] = self.errors.get(key, 0) + 1
        b = (elapsed_ns >> 10).bit_length()
        kind.latency[b if b < LAT_BUCKETS else LAT_BUCKETS - 1] += 1

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    # -- reporting (not on the hot path) ----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"admin": _kind_dict(self.admin, AdminOpcode),
                "io": _kind_dict(self.io, IoOpcode),
                "errors": [_status_dict(k, n) for k, n in sorted(self.errors.items())]}


def _opcode_name(enum: Any, opc: int) -> str:
    try:
        return str(enum(opc).name).lower()
    except ValueError:
        return f"opcode_{opc:02x}h"


def _kind_dict(k: QueueKindStats, enum: Any) -> dict[str, Any]:
    ops = [{"opcode": opc, "name": _opcode_name(enum, opc), "commands": n, "bytes": b}
           for opc, (n, b) in sorted(k.ops.items())]
    buckets = [{"lt_ns": (LAT_UNIT_NS << i) if i < LAT_BUCKETS - 1 else None, "count": n}
               for i, n in enumerate(k.latency) if n]
    return {"commands": sum(o["commands"] for o in ops), "bytes": sum(o["bytes"] for o in ops),
            "opcodes": ops, "latency": buckets}


def _status_dict(key: int, count: int) -> dict[str, Any]:
    sct, sc = key >> 8, key & 0xFF
    name = f"sct{sct:x}h_sc{sc:02x}h"
    enum = {SCT.GENERIC: Generic, SCT.COMMAND_SPECIFIC: CommandSpecific}.get(sct)  # type: ignore[call-overload]
    if enum is not None:
        try:
            name = str(enum(sc).name).lower()
        except ValueError:
            pass
    return {"sct": sct, "sc": sc, "name": name, "count": count}
