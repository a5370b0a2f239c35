"""A live migration as one emulator process sees it: the ``migration`` and
``migration.progress`` methods of the control socket (docs/management-socket.md).

The migration is driven by the MMH (``nvme-emu migrate``), a separate process,
so the emulator knows two things about one that runs:

* its own TP4159 state: which controllers are suspended (and by which MMC) or
  released after a hand-over, which Controller Data Queues log user data
  changes and how full they are, which host memory is tracked and how many
  granules are dirty, Set Controller State sequences that are open, and
  vfio-user connections paused for a hand-over;
* what an MMH tells it with ``migration.progress`` (phase, round, bytes...):
  kept until that control client reports again or disconnects.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from emulator.control import ControlServer, Request
from emulator.control.server import ControlConnection

if TYPE_CHECKING:
    from emulator.subsystem.parts import RuntimeParts

_PROGRESS_KEY = "migration.progress"


class MigrationView:
    def __init__(self, rt: "RuntimeParts") -> None:
        self.rt = rt
        self.reported: dict[int, dict[str, Any]] = {}   # control connection number -> progress

    def register(self, control: ControlServer) -> None:
        control.register("migration", self.migration)
        control.register("migration.progress", self.progress)
        control.on_disconnect.append(self._gone)

    # -- methods ------------------------------------------------------------------
    def progress(self, req: Request) -> bool:
        """An MMH reports its progress: ``phase`` (string) and any numbers it has."""
        p = req.params
        if not isinstance(p.get("phase"), str):
            raise ValueError("phase (a string) is required")
        for k, v in p.items():
            if not isinstance(v, (str, int, float, bool)) and v is not None:
                raise ValueError(f"{k}: a string, number, boolean or null")
        self.reported[req.conn.number] = {**p, "client": req.conn.number, "reported_at": time.time()}
        req.conn.data[_PROGRESS_KEY] = True
        return True

    def migration(self, req: Request) -> dict[str, Any]:
        if req.params:
            raise ValueError(f"unknown params {sorted(req.params)}")
        return view(self.rt, list(self.reported.values()))

    def _gone(self, conn: ControlConnection) -> None:
        self.reported.pop(conn.number, None)


def view(rt: "RuntimeParts", reported: list[dict[str, Any]]) -> dict[str, Any]:
    from emulator.nvme.migration.model import MMC_KEY, TARGET_KEY, mmc_state, target_state
    ctrls, mmcs = [], []
    for cntlid, ctrl in sorted(rt.subsystem.controllers.items()):
        server = rt.servers.get(cntlid)
        if ctrl.config.is_mmc:
            if MMC_KEY not in ctrl.state.vendor:
                continue
            m = mmc_state(ctrl)
            mmcs.append({
                "cntlid": cntlid,
                "cdqs": [{"cdqid": q.cdqid, "cntlid": q.cntlid, "logging": q.logging, "slots": q.slots,
                          "used": q.used()} for _, q in sorted(m.cdqs.items())],
                "tracks": [{"cntlid": t.cntlid, "granule": 1 << t.gshift, "granules": len(t.dirty),
                            "dirty": len(t.dirty) - t.dirty.count(0)} for _, t in sorted(m.tracks.items())],
                "sequences": [{"cntlid": k, "bytes": len(v)} for k, v in sorted(m.sequences.items())],
            })
            continue
        ts = target_state(ctrl) if TARGET_KEY in ctrl.state.vendor else None
        ctrls.append({
            "cntlid": cntlid,
            "suspended": bool(ctrl.state.suspended),
            "suspended_by": ts.suspended_by if ts is not None and ts.suspended_by >= 0 else None,
            "released": bool(ts is not None and ts.released),
            "paused": bool(server is not None and server.connected and server.paused),
        })
    active = bool(reported) or any(c["suspended"] or c["paused"] for c in ctrls) or any(
        m["tracks"] or m["sequences"] or any(q["logging"] for q in m["cdqs"]) for m in mmcs)
    return {"version": 1, "active": active, "reported": reported, "controllers": ctrls, "mmcs": mmcs}
