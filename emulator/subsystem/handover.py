"""Control-socket methods that move a live vfio-user session between processes.

The MMH (``nvme-emu migrate``) calls them, in this order, around the TP4159
state transfer (docs/live-migration.md):

* source ``handover.pause``    stop reading the guest's connection at a message boundary
* (MMH: Migration Receive of the controller state, Set Controller State on the destination)
* source ``handover.export``   the connection fd, DMA and interrupt fds (SCM_RIGHTS), session
                               and PCI function state (JSON)
* destination ``handover.adopt``  take them, PCI function state loaded, DMA maps and interrupt
                               fds set up; the socket is not read yet
* (MMH: Migration Send Resume on the destination)
* source ``handover.release``  forget the connection; the controller stays suspended for good
* destination ``handover.start``  read the socket: QEMU's queued messages are served by it

Undo steps: ``handover.unpause`` (source), ``handover.discard`` (destination).
If the control client that paused (adopted) a session disconnects before
``release`` (``start``), the source reads its connection again and the
destination discards what it adopted.

This module wires servers to controllers (the subsystem layer); the vfio-user
server moves only a session and an opaque device state.
"""
from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING, Any

from emulator.control import ControlServer, MethodError, Reply, Request
from emulator.control.server import ControlConnection
from emulator.vfio_user.codec import close_fds
from emulator.vfio_user.server import VfioUserServer
from emulator.vfio_user.session import HandoverState

if TYPE_CHECKING:
    from emulator.subsystem.runtime import Runtime

PAUSE_TIMEOUT = 5.0  # seconds to wait for a message boundary


class Handover:
    def __init__(self, runtime: "Runtime") -> None:
        self.rt = runtime

    def register(self, control: ControlServer) -> None:
        for name, fn in (("subsystem.info", self.subsystem_info), ("session.info", self.info), ("handover.pause", self.pause),
                         ("handover.unpause", self.unpause), ("handover.export", self.export),
                         ("handover.adopt", self.adopt), ("handover.start", self.start),
                         ("handover.discard", self.discard), ("handover.release", self.release)):
            control.register(name, fn)
        control.on_disconnect.append(self._client_gone)

    def _server(self, req: Request) -> tuple[int, VfioUserServer]:
        cntlid = req.params["cntlid"]
        server = self.rt.servers.get(cntlid) if isinstance(cntlid, int) else None
        if server is None:
            raise MethodError(f"no controller {cntlid!r}")
        return cntlid, server

    @staticmethod
    def _mark(conn: ControlConnection, key: str, cntlid: int, on: bool) -> None:
        marks: set[int] = conn.data.setdefault(key, set())
        (marks.add if on else marks.discard)(cntlid)

    # -- methods ------------------------------------------------------------------
    def subsystem_info(self, req: Request) -> dict[str, Any]:
        """NQN, namespaces and controllers (with their socket paths) of this process."""
        cfg = self.rt.config
        return {"nqn": cfg.subsystem.nqn, "control_socket": str(cfg.control_path),
                "namespaces": [{"nsid": n.nsid, "size": n.size, "lba_size": n.lba_size}
                               for n in cfg.namespaces],
                "controllers": [{"cntlid": c.cntlid, "type": c.type, "socket": str(c.socket),
                                 "namespaces": list(c.namespaces)} for c in cfg.controllers]}

    def info(self, req: Request) -> dict[str, Any]:
        """{"connected", "paused", "dma": [[iova, size], ...]} of a controller's socket."""
        _, server = self._server(req)
        session = server.session
        return {"connected": server.connected, "paused": server.paused,
                "dma": [list(m) for m in session.dma_maps()] if session is not None else []}

    async def pause(self, req: Request) -> dict[str, Any]:
        cntlid, server = self._server(req)
        deadline = time.monotonic() + PAUSE_TIMEOUT
        while True:
            try:
                server.pause()
                break
            except RuntimeError as e:
                if not server.connected or time.monotonic() > deadline:
                    raise MethodError(f"controller {cntlid}: cannot pause: {e}") from None
            await asyncio.sleep(0.0005)
        self._mark(req.conn, "paused", cntlid, True)
        return {}

    def unpause(self, req: Request) -> dict[str, Any]:
        cntlid, server = self._server(req)
        if server.paused:
            server.start_reading()
        self._mark(req.conn, "paused", cntlid, False)
        return {}

    def export(self, req: Request) -> Reply:
        cntlid, server = self._server(req)
        try:
            sock_fd, state, device = server.export_connection()
        except RuntimeError as e:
            raise MethodError(f"controller {cntlid}: {e}") from None
        return Reply({"session": state.to_dict(), "device": device}, [sock_fd] + state.fds())

    def adopt(self, req: Request) -> dict[str, Any]:
        fds = list(req.fds)
        try:
            cntlid, server = self._server(req)
            if not fds:
                raise MethodError("no connection fd")
            sock = socket.socket(fileno=fds.pop(0))
            state = HandoverState.from_dict(req.params["session"], fds)
        except BaseException:
            close_fds(fds)
            raise
        fds = []
        try:
            server.adopt_connection(sock, state, reading=False, device_state=req.params["device"])
        except RuntimeError as e:
            raise MethodError(f"controller {cntlid}: {e}") from None
        self._mark(req.conn, "staged", cntlid, True)
        return {}

    def start(self, req: Request) -> dict[str, Any]:
        cntlid, server = self._server(req)
        if not server.connected:
            raise MethodError(f"controller {cntlid}: no session to start")
        server.start_reading()
        self._mark(req.conn, "staged", cntlid, False)
        return {}

    def discard(self, req: Request) -> dict[str, Any]:
        cntlid, server = self._server(req)
        if server.paused:
            self._discard(cntlid, server)
        self._mark(req.conn, "staged", cntlid, False)
        return {}

    def _discard(self, cntlid: int, server: VfioUserServer) -> None:
        """Drop an adopted session that never ran here; the controller goes back to its
        power-on state (a later migration can set a state into it again)."""
        server.disconnect()
        self.rt.subsystem.controllers[cntlid].function_reset()

    def release(self, req: Request) -> dict[str, Any]:
        cntlid, server = self._server(req)
        try:
            server.release()
        except RuntimeError as e:
            raise MethodError(f"controller {cntlid}: {e}") from None
        from emulator.nvme.migration import send
        send.release(self.rt.subsystem.controllers[cntlid])
        self._mark(req.conn, "paused", cntlid, False)
        return {}

    # -- the rule when the MMH goes away mid-way -------------------------------------
    def _client_gone(self, conn: ControlConnection) -> None:
        for cntlid in conn.data.get("paused", ()):
            server = self.rt.servers.get(cntlid)
            if server is not None and server.paused:
                self.rt.log.warning("control client left controller %d paused: reading again", cntlid)
                server.start_reading()
        for cntlid in conn.data.get("staged", ()):
            server = self.rt.servers.get(cntlid)
            if server is not None and server.paused:
                self.rt.log.warning("control client left an adopted session of controller %d: discarded",
                                    cntlid)
                self._discard(cntlid, server)
