"""Wiring: a SubsystemConfig becomes namespaces, controllers, PCI functions
and vfio-user servers on one asyncio event loop.

Everything runs on that loop's thread: socket messages, doorbells, command
execution and timers.  ``RuntimeThread`` runs a whole subsystem in a
background thread (tests and tools); ``serve`` runs it in the foreground.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, TypeVar

from emulator import pollloop
from emulator.control import ControlServer
from emulator.nvme.dispatch import new_controller
from emulator.nvme.namespace import Namespace
from emulator.pci.function import NvmePciFunction
from emulator.pci.ids import NVME_EMU_VENDOR_ID
from emulator.subsystem import monitor, nsstore
from emulator.subsystem.config import SubsystemConfig
from emulator.subsystem.devmig import NvmeDeviceMigration
from emulator.subsystem.handover import Handover
from emulator.subsystem.subsystem import Subsystem
from emulator.vfio_user.dmawrite import DEFAULT_MODE, Mode
from emulator.vfio_user.migration import MigrationFeatures
from emulator.vfio_user.server import VfioUserServer

log = logging.getLogger("nvme-emu")
T = TypeVar("T")


class Runtime:
    def __init__(self, config: SubsystemConfig, loop: asyncio.AbstractEventLoop,
                 visible_writes: Mode = DEFAULT_MODE) -> None:
        self.config = config
        self.loop = loop
        info = config.subsystem
        self.subsystem = Subsystem(**dataclasses.asdict(info), vendor_id=NVME_EMU_VENDOR_ID,
                                   state_dir=config.state_dir)
        self.functions: dict[int, NvmePciFunction] = {}
        self.servers: dict[int, VfioUserServer] = {}
        config.state_dir.mkdir(parents=True, exist_ok=True)
        saved = nsstore.load(config.state_dir)
        if saved is None:
            ns_configs = list(config.namespaces)
            attachments = {cc.cntlid: list(cc.namespaces) for cc in config.controllers}
        else:
            ns_configs, attachments = saved
            log.info("namespaces from %s (Namespace Management state)",
                     nsstore.registry_path(config.state_dir))
        for nc in ns_configs:
            self.subsystem.namespaces[nc.nsid] = Namespace(nc, info.nqn)
        for cc in config.controllers:
            fn = NvmePciFunction(msix_vectors=cc.msix_vectors)
            ctrl = new_controller(cc, self.subsystem, irq=fn, scheduler=loop)
            fn.bind(ctrl)
            # vfio-user migration v2 (DEVICE_FEATURE 16): the session finds it on the backend
            if not cc.is_mmc:
                shared = all(self.config.namespace(n).shared_storage for n in cc.namespaces) and bool(cc.namespaces)
                fn.mig_features = MigrationFeatures(NvmeDeviceMigration(fn, ctrl, shared_storage=shared))
            self.subsystem.controllers[cc.cntlid] = ctrl
            self.functions[cc.cntlid] = fn
            Path(cc.socket).parent.mkdir(parents=True, exist_ok=True)
            self.servers[cc.cntlid] = VfioUserServer(str(cc.socket), fn, loop,
                                                     logging.getLogger(f"nvme-emu.ctrl{cc.cntlid}"),
                                                     visible_writes=visible_writes)
        for cntlid, nsids in attachments.items():
            if cntlid in self.subsystem.controllers:
                self.subsystem.attachments[cntlid] = {n for n in nsids if n in self.subsystem.namespaces}
        self.subsystem.on_change = nsstore.save
        self.log = log
        self.control = ControlServer(config.control_path, loop)
        Handover(self).register(self.control)
        monitor.register(self, self.control)

    def start(self) -> list[str]:
        """Listen on the control socket and every controller socket; returns the
        controller socket paths."""
        self.control.start()
        paths = []
        for cntlid, server in self.servers.items():
            server.start()
            paths.append(str(server.path))
        return paths

    def close(self) -> None:
        self.control.close()
        for server in self.servers.values():
            try:
                server.close()
            except Exception:
                log.exception("closing server")
        for ctrl in self.subsystem.controllers.values():
            for ns in ctrl.attached_namespaces():
                ns.flush()
        self.subsystem.close()


class RuntimeThread:
    """A Runtime on its own event loop in a background thread."""

    def __init__(self, config: SubsystemConfig, visible_writes: Mode = DEFAULT_MODE) -> None:
        self.config = config
        self.visible_writes = visible_writes
        self.loop = pollloop.new_event_loop()  # NVMe shadow tail polling may wait in C
        self._ready: Future[Runtime] = Future()
        self._thread = threading.Thread(target=self._main, name="nvme-emu", daemon=True)
        self.runtime: Runtime | None = None
        self.sockets: list[str] = []

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            rt = Runtime(self.config, self.loop, visible_writes=self.visible_writes)
            self.sockets = rt.start()
            self.runtime = rt
            self._ready.set_result(rt)
        except BaseException as e:
            self._ready.set_exception(e)
            return
        self.loop.run_forever()
        try:
            rt.close()
        finally:
            self.loop.close()

    def start(self, timeout: float = 10.0) -> "RuntimeThread":
        self._thread.start()
        self._ready.result(timeout)
        return self

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        """Run ``fn`` on the loop thread and return its result."""
        fut: Future[T] = Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)
        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)

    def socket(self, cntlid: int) -> str:
        for cc in self.config.controllers:
            if cc.cntlid == cntlid:
                return str(cc.socket)
        raise KeyError(cntlid)
