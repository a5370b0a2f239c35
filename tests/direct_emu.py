"""The ``Emu`` interface (tests/emu_fixture.py) over DirectTransport: the subsystem is built
in this process and hosts call the controller directly (no sockets, no event loop).

For tests that must run without the vfio-user wiring, and for child processes
that drive a controller and then die abruptly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

from emu_fixture import Emu
from emulator.host.memory import HostMemory
from emulator.host.transport import DirectTransport
from emulator.nvme.controller import Controller, ControllerConfig
from emulator.nvme.namespace import Namespace, NamespaceConfig
from emulator.subsystem.subsystem import Subsystem

T = TypeVar("T")


class DirectEmu(Emu):
    _sub: Subsystem | None = None

    def start(self) -> "DirectEmu":
        info = self.config.subsystem
        sub = Subsystem(nqn=info.nqn, serial=info.serial, model=info.model, firmware=info.firmware)
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        for nsc in self.config.namespaces:
            sub.namespaces[nsc.nsid] = Namespace(
                NamespaceConfig(nsc.nsid, Path(nsc.file), nsc.size, nsc.lba_size, nsc.tlbaag), info.nqn)
        for cc in self.config.controllers:
            sub.controllers[cc.cntlid] = Controller(
                ControllerConfig(cc.cntlid, kind=cc.type, nsids=tuple(cc.namespaces),
                                 max_io_queues=cc.max_io_queues, mqes=cc.mqes, mdts=cc.mdts,
                                 msix_vectors=cc.msix_vectors), sub)
        self._sub = sub
        return self

    def stop(self) -> None:
        super().stop()
        if self._sub is not None:
            self._sub.close()
            self._sub = None

    @property
    def subsystem(self) -> Subsystem:
        assert self._sub is not None
        return self._sub

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    def connect(self, cntlid: int = 1, memory: HostMemory | None = None,  # type: ignore[override]
                vectors: int = 8, posted_writes: bool = True) -> DirectTransport:
        return DirectTransport(self.subsystem.controllers[cntlid], memory or HostMemory(32 << 20))
