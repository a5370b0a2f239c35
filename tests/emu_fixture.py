"""Run whole subsystems in-process over vfio-user, and hosts that drive them.

``emu(config)`` gives an :class:`Emu`: a RuntimeThread serving the YAML-shaped
``config`` (dict) on real UNIX sockets, and ``host(cntlid)`` connects an
``NvmeHost`` to a controller over vfio-user, just as QEMU would.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any

from emulator.host.driver import NvmeHost
from emulator.host.memory import HostMemory
from emulator.host.transport import VfioUserTransport
from emulator.subsystem.config import parse_config

DEFAULT_CONFIG: dict[str, Any] = {
    "namespaces": [{"nsid": 1, "size": "64MiB", "lba_size": 512}],
    "controllers": [{"cntlid": 1, "type": "io"}],
}


class Emu:
    def __init__(self, config: dict[str, Any] | None = None, state_dir: Path | None = None,
                 visible_writes: str = "boot") -> None:
        self.visible_writes = visible_writes
        self.raw = copy.deepcopy(config or DEFAULT_CONFIG)
        # Short paths: sockaddr_un paths are limited to 107 bytes.
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="ne-"))
        self.raw.setdefault("state_dir", str(self.state_dir))
        self.config = parse_config(self.raw, self.state_dir)
        self.rt: Any = None
        self.hosts: list[NvmeHost] = []

    def start(self) -> "Emu":
        from emulator.subsystem.runtime import RuntimeThread
        self.rt = RuntimeThread(self.config, visible_writes=self.visible_writes).start()  # type: ignore[arg-type]
        return self

    def stop(self) -> None:
        for h in self.hosts:
            try:
                h.close()
            except Exception:
                pass
        self.hosts.clear()
        if self.rt is not None:
            self.rt.stop()
            self.rt = None

    def restart(self) -> "Emu":
        self.stop()
        return self.start()

    @property
    def subsystem(self) -> Any:
        assert self.rt is not None and self.rt.runtime is not None
        return self.rt.runtime.subsystem

    def call(self, fn: Any, *args: Any) -> Any:
        """Run fn on the emulator's loop thread (safe access to live objects)."""
        assert self.rt is not None
        return self.rt.call(fn, *args)

    def connect(self, cntlid: int = 1, memory: HostMemory | None = None,
                vectors: int = 8, posted_writes: bool = True, serve_dma: bool = False) -> VfioUserTransport:
        """``serve_dma``: the client answers the server's DMA_READ/DMA_WRITE against the host memory."""
        from emulator.vfio_user.client import VfioUserClient
        assert self.rt is not None
        memory = memory or HostMemory(32 << 20, sealed=True)  # like QEMU's memfd backend
        client = VfioUserClient(self.rt.socket(cntlid), memory=memory if serve_dma else None)
        return VfioUserTransport(client, memory, vectors=vectors, posted_writes=posted_writes)

    def host(self, cntlid: int = 1, io_queues: int = 1, qsize: int = 64, init: bool = True,
             memory: HostMemory | None = None, use_interrupts: bool = False, serve_dma: bool = False) -> NvmeHost:
        h = NvmeHost(self.connect(cntlid, memory, serve_dma=serve_dma), use_interrupts=use_interrupts)
        if init:
            h.init(io_queues=io_queues, qsize=qsize)
        self.hosts.append(h)
        return h

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)
