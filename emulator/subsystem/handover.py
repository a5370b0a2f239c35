"""Control-socket methods that move a live vfio-user session between processes.

The MMH (``nvme-emu migrate``) calls them, in this order, around the TP4159
state transfer (docs/live-migration.md):

* source ``handover.pause``    stop reading the guest's connection (once no reply is half sent); the
                               controller is held (a wake waits for the end of the hand-over)
* (MMH: Migration Receive of the controller state, Set Controller State on the destination)
* source ``handover.export``   the connection fd, DMA and interrupt fds (SCM_RIGHTS), session
                               and PCI function state (JSON), and what the source read of the
                               socket and did not handle yet (part of a message, its fds)
* destination ``handover.adopt``  take them, PCI function state loaded, DMA maps and interrupt
                               fds set up; the socket is not read yet.  With ``source``
                               (its control socket and CNTLID) the destination commits by
                               itself when its controller is resumed:
* (MMH: Migration Send Resume on the destination) -> the destination reads the socket
  (QEMU's queued messages are served by it), then calls the source's ``handover.release``
  (forget the connection; its controller stays suspended).  ``handover.wait`` returns once
  it reads.  (Without ``source``: the MMH calls ``handover.release`` and ``handover.start``.)

Undo steps: ``handover.unpause`` (source), ``handover.discard`` (destination).
If the control client that paused a session disconnects, the source waits
``RELEASE_GRACE`` seconds for a release (a destination committing), then reads
its connection again and ends the hold.  If the control client that adopted a
session disconnects before its controller was resumed (by Migration Send
Resume, not by an MMC reset), the destination discards it.

This module wires servers to controllers (the subsystem layer); the vfio-user
server moves only a session and an opaque device state.
"""
from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING, Any

from emulator.control import ControlClient, ControlError, ControlServer, MethodError, Reply, Request
from emulator.control.server import ControlConnection
from emulator.nvme.migration import send
from emulator.vfio_user.codec import close_fds
from emulator.vfio_user.server import VfioUserServer
from emulator.vfio_user.session import HandoverState

if TYPE_CHECKING:
    from emulator.subsystem.parts import RuntimeParts

PAUSE_TIMEOUT = 5.0  # seconds to wait for a half-sent reply (or DMA_WRITE replies) to clear
RELEASE_GRACE = 1.0  # seconds a paused source waits for a release after its MMH went away
COMMIT_TIMEOUT = 2.0  # seconds the destination gives the source to answer the release


class Handover:
    def __init__(self, runtime: "RuntimeParts") -> None:
        self.rt = runtime
        self.sources: dict[int, dict[str, Any]] = {}  # adopted cntlid -> the source to release
        # cntlid -> (control client, the session object) that paused / adopted it
        self.paused_by: dict[int, tuple[ControlConnection, Any]] = {}
        self.staged_by: dict[int, tuple[ControlConnection, Any]] = {}

    def register(self, control: ControlServer) -> None:
        for name, fn in (("subsystem.info", self.subsystem_info), ("session.info", self.info),
                         ("handover.pause", self.pause), ("handover.unpause", self.unpause), ("handover.export", self.export),
                         ("handover.adopt", self.adopt), ("handover.start", self.start),
                         ("handover.discard", self.discard), ("handover.release", self.release),
                         ("handover.wait", self.wait)):
            control.register(name, fn)
        control.on_disconnect.append(self._client_gone)
        send.RESUMED.append(self._resumed)

    def _server(self, req: Request) -> tuple[int, VfioUserServer]:
        cntlid = req.params["cntlid"]
        server = self.rt.servers.get(cntlid) if isinstance(cntlid, int) else None
        if server is None:
            raise MethodError(f"no controller {cntlid!r}")
        return cntlid, server

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
        """{"connected", "paused", "buffered", "dma": [[iova, size], ...]} of a controller's socket
        (``buffered``: bytes read and not handled yet, part of a message)."""
        _, server = self._server(req)
        session = server.session
        return {"connected": server.connected, "paused": server.paused, "buffered": server.buffered,
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
        send.hold(self.rt.subsystem.controllers[cntlid], True)
        self.paused_by[cntlid] = (req.conn, server.session)
        return {}

    def unpause(self, req: Request) -> dict[str, Any]:
        cntlid, server = self._server(req)
        self._unpause(cntlid, server)
        return {}

    def _unpause(self, cntlid: int, server: VfioUserServer) -> None:
        self.paused_by.pop(cntlid, None)
        if server.paused:
            server.start_reading()
        send.hold(self.rt.subsystem.controllers[cntlid], False)

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
        source = req.params.get("source")
        if source is not None and not (isinstance(source, dict) and isinstance(source.get("control"), str)
                                       and isinstance(source.get("cntlid"), int)):
            sock.close()
            state.close()
            raise MethodError("source must be {control: path, cntlid: n}")
        try:
            server.adopt_connection(sock, state, reading=False, device_state=req.params["device"])
        except RuntimeError as e:
            raise MethodError(f"controller {cntlid}: {e}") from None
        if source is not None:
            self.sources[cntlid] = source
        self.staged_by[cntlid] = (req.conn, server.session)
        return {}

    def _resumed(self, ctrl: Any) -> None:
        """Migration Send Resume of one of our controllers: commit an adopted connection."""
        cntlid = ctrl.cntlid
        if self.rt.subsystem.controllers.get(cntlid) is ctrl and cntlid in self.sources:
            self.staged_by.pop(cntlid, None)  # resumed here: no longer the MMH's to discard
            self.rt.loop.call_soon(self._commit, cntlid)

    def _commit(self, cntlid: int) -> None:
        """Read the connection here, then have the source forget its copy (the source is
        paused and its controller held, so it does not read meanwhile)."""
        source = self.sources.pop(cntlid, None)
        server = self.rt.servers[cntlid]
        if source is None or not server.paused:
            return
        self.staged_by.pop(cntlid, None)
        server.start_reading()
        try:
            with ControlClient(source["control"], timeout=COMMIT_TIMEOUT) as c:
                c.call("handover.release", {"cntlid": source["cntlid"]})
        except (ControlError, OSError) as e:  # a dead source took its copy with it
            self.rt.log.warning("controller %d: the source did not release (%s)", cntlid, e)
        self.rt.log.info("controller %d: hand-over committed", cntlid)

    async def wait(self, req: Request) -> dict[str, Any]:
        """Wait until the connection of ``cntlid`` is read here (true), or is gone (false)."""
        cntlid, server = self._server(req)
        deadline = time.monotonic() + float(req.params.get("timeout", 10.0))
        while server.paused and time.monotonic() < deadline:
            await asyncio.sleep(0.0002)
        return {"serving": server.connected and not server.paused}

    def start(self, req: Request) -> dict[str, Any]:
        cntlid, server = self._server(req)
        if not server.connected:
            raise MethodError(f"controller {cntlid}: no session to start")
        server.start_reading()
        self.staged_by.pop(cntlid, None)
        return {}

    def discard(self, req: Request) -> dict[str, Any]:
        cntlid, server = self._server(req)
        self.sources.pop(cntlid, None)
        if server.paused:
            self._discard(cntlid, server)
        return {}

    def _discard(self, cntlid: int, server: VfioUserServer) -> None:
        """Drop an adopted session that never ran here; the controller goes back to its
        power-on state (a later migration can set a state into it again)."""
        self.staged_by.pop(cntlid, None)
        server.disconnect()
        self.rt.subsystem.controllers[cntlid].function_reset()

    def release(self, req: Request) -> dict[str, Any]:
        cntlid, server = self._server(req)
        try:
            server.release()
        except RuntimeError as e:
            raise MethodError(f"controller {cntlid}: {e}") from None
        send.release(self.rt.subsystem.controllers[cntlid])
        self.paused_by.pop(cntlid, None)
        return {}

    # -- the rule when the MMH goes away mid-way -------------------------------------
    def _client_gone(self, conn: ControlConnection) -> None:
        for cntlid, (c, session) in list(self.paused_by.items()):
            if c is conn:
                self.rt.loop.call_later(RELEASE_GRACE, self._grace_over, cntlid, session)
        for cntlid, (c, session) in list(self.staged_by.items()):
            server = self.rt.servers.get(cntlid)
            if c is conn and server is not None and server.session is session and server.paused:
                self.rt.log.warning("control client left an adopted session of controller %d: discarded",
                                    cntlid)
                self.sources.pop(cntlid, None)
                self._discard(cntlid, server)

    def _grace_over(self, cntlid: int, session: Any) -> None:
        server = self.rt.servers.get(cntlid)
        if server is not None and server.session is session and server.paused:
            self.rt.log.warning("control client left controller %d paused: reading again", cntlid)
            self._unpause(cntlid, server)
