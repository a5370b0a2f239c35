"""What a running emulator is doing, as plain data: the ``status`` and ``stats``
methods of the control socket (docs/management-socket.md describes every field).

Both are plain functions of the running emulator (``RuntimeParts``) returning
JSON-able dicts; they run on the runtime's event loop (the control server calls
them there), so they read live objects without locks.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from emulator.control import ControlServer, MethodError, Request
from emulator.nvme.spec import CC_EN, CC_SHN_MASK, CC_SHN_SHIFT, CSTS_RDY, CSTS_SHST_SHIFT
from emulator.subsystem.migration_view import MigrationView

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.subsystem.parts import RuntimeParts

SCHEMA_VERSION = 1
_STARTED = time.monotonic()


def _controller_status(rt: "RuntimeParts", ctrl: "Controller") -> dict[str, Any]:
    regs = ctrl.state.regs
    server = rt.servers.get(ctrl.cntlid)
    creds = server.peer_credentials() if server is not None else None
    client = None
    if server is not None and server.connected:
        client = {"pid": creds[0] if creds else None, "uid": creds[1] if creds else None,
                  "paused": server.paused}
    return {
        "cntlid": ctrl.cntlid,
        "type": ctrl.config.type,
        "socket": str(server.path) if server is not None else None,
        "enabled": bool(regs.cc & CC_EN),                       # CC.EN (Base 2.1 §3.1.4.5)
        "ready": bool(regs.csts & CSTS_RDY),                    # CSTS.RDY
        "shutdown_notification": (regs.cc >> CC_SHN_SHIFT) & CC_SHN_MASK,   # CC.SHN
        "shutdown_status": (regs.csts >> CSTS_SHST_SHIFT) & 0x3,            # CSTS.SHST
        "suspended": bool(ctrl.state.suspended),                # TP4159 Migration Send Suspend
        "client": client,
        "queues": {
            "sq": [{"qid": s.qid, "cqid": s.cqid, "size": s.size, "head": s.head, "tail": s.tail}
                   for s in sorted(ctrl.sqs.values(), key=lambda s: s.qid)],
            "cq": [{"qid": c.qid, "size": c.size, "head": c.head, "tail": c.tail, "iv": c.iv,
                    "ien": c.ien} for c in sorted(ctrl.cqs.values(), key=lambda c: c.qid)],
        },
        "namespaces": sorted(ctrl.config.namespaces),
    }


def status(rt: "RuntimeParts") -> dict[str, Any]:
    """Controllers (enabled, suspended, client, queues, namespaces) and capacity."""
    sub = rt.subsystem
    namespaces = []
    for nsid, ns in sorted(sub.namespaces.items()):
        allocated = ns.nuse() * ns.lba_size
        namespaces.append({"nsid": nsid, "file": str(ns.path), "size": ns.nsze * ns.lba_size,
                           "lba_size": ns.lba_size, "tlbaag": ns.allocation.tlbaag,
                           "allocated": allocated})
    return {
        "version": SCHEMA_VERSION,
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - _STARTED, 3),
        "subsystem": {"nqn": sub.nqn, "serial": sub.serial, "model": sub.model,
                      "firmware": sub.firmware},
        "controllers": [_controller_status(rt, c) for _, c in sorted(sub.controllers.items())],
        "namespaces": namespaces,
        "capacity": {"size": sum(n["size"] for n in namespaces),
                     "allocated": sum(n["allocated"] for n in namespaces)},
    }


def stats(rt: "RuntimeParts", cntlid: int | None = None, reset: bool = False) -> dict[str, Any]:
    """Per controller: commands and bytes by opcode, errors by status, latency."""
    ctrls = sorted(rt.subsystem.controllers.items())
    if cntlid is not None:
        ctrls = [(k, c) for k, c in ctrls if k == cntlid]
    out = []
    for k, c in ctrls:
        d = {"cntlid": k, **c.cmd_stats.to_dict()}
        if reset:
            c.cmd_stats.reset()
        out.append(d)
    return {"version": SCHEMA_VERSION, "time": time.time(), "controllers": out}


def register(rt: "RuntimeParts", control: ControlServer) -> None:
    """Add ``status``, ``stats``, ``migration`` and ``migration.progress`` to the control socket."""
    def _status(req: Request) -> dict[str, Any]:
        _no_fds(req, ())
        return status(rt)

    def _stats(req: Request) -> dict[str, Any]:
        _no_fds(req, ("cntlid", "reset"))
        cntlid = req.params.get("cntlid")
        if cntlid is not None and (not isinstance(cntlid, int) or cntlid not in rt.subsystem.controllers):
            raise MethodError(f"no controller {cntlid!r}")
        reset = req.params.get("reset", False)
        if not isinstance(reset, bool):
            raise ValueError("reset must be true or false")
        return stats(rt, cntlid, reset)

    control.register("status", _status)
    control.register("stats", _stats)
    MigrationView(rt).register(control)


def _no_fds(req: Request, allowed: tuple[str, ...]) -> None:
    for fd in req.fds:
        os.close(fd)
    req.fds.clear()
    unknown = sorted(set(req.params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown params {unknown}")
