"""One side of a migration: an emulator process reached through its control
socket, its MMC (vfio-user client with the MMH's own memfd host memory) and
the migratable controller that moves."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emulator.control import ControlClient
from emulator.host.driver import NvmeHost
from emulator.host.lm import MigrationHost
from emulator.host.memory import HostMemory
from emulator.host.transport import VfioUserTransport


class MigrationError(RuntimeError):
    """The migration cannot go on; the message says why (for the user)."""


@dataclass
class Endpoint:
    name: str  # "source" / "destination", for messages
    control_path: str
    cntlid: int  # the migratable controller
    mmc_cntlid: int | None = None  # None: the process's only MMC
    info: dict[str, Any] = field(default_factory=dict)
    control: ControlClient | None = None
    host: NvmeHost | None = None
    lm: MigrationHost | None = None

    def connect(self, memory: HostMemory, io_queues: int = 1, qsize: int = 64) -> None:
        from emulator.vfio_user.client import VfioUserClient
        try:
            self.control = ControlClient(self.control_path)
        except OSError as e:
            raise MigrationError(f"{self.name}: cannot reach control socket {self.control_path}: {e}") from e
        self.info = self.control.call("subsystem.info")
        ctrls = {c["cntlid"]: c for c in self.info["controllers"]}
        target = ctrls.get(self.cntlid)
        if target is None or target["type"] != "io":
            raise MigrationError(f"{self.name}: no migratable controller {self.cntlid}")
        mmcs = [c for c in ctrls.values() if c["type"] == "mmc"
                and (self.mmc_cntlid is None or c["cntlid"] == self.mmc_cntlid)]
        if len(mmcs) != 1:
            raise MigrationError(f"{self.name}: {len(mmcs)} MMCs match; name one (--mmc)")
        self.mmc_cntlid = mmcs[0]["cntlid"]
        try:
            client = VfioUserClient(mmcs[0]["socket"], timeout=30.0)
            self.host = NvmeHost(VfioUserTransport(client, memory), memory, timeout=30.0, use_interrupts=True)
            self.host.init(io_queues=io_queues, qsize=qsize)
        except Exception as e:
            raise MigrationError(f"{self.name}: cannot drive MMC {self.mmc_cntlid} at {mmcs[0]['socket']}: {e}") \
                from e
        self.lm = MigrationHost(self.host)

    @property
    def namespaces(self) -> list[int]:
        """The namespaces attached to the migratable controller."""
        for c in self.info["controllers"]:
            if c["cntlid"] == self.cntlid:
                return sorted(c["namespaces"])
        return []

    def call(self, method: str, **params: Any) -> Any:
        assert self.control is not None
        return self.control.call(method, params)

    def close(self) -> None:
        if self.host is not None:
            try:
                self.host.close()
            except Exception:
                pass
            self.host = None
        if self.control is not None:
            self.control.close()
            self.control = None
